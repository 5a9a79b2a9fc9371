"""3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(4x4, 3x3) on the CPU.

A 3x3 convolution costs 9 multiply-adds per output pixel and channel pair; F(4, 3) computes a
4x4 output tile from a 6x6 input tile with 36, i.e. 2.25 per pixel (4x fewer on large maps;
the mask head's 14x14 RoIs overhang their tiles and share them on a canvas, see
`choose_canvas`: 3.5x fewer). Per batch:

    V[p] (C, tiles) = input transform  Bᵀ d B of every 6x6 tile d of x     (C++ kernel)
    U[p] (O, C)     = weight transform G g Gᵀ of every 3x3 filter g        (C++ kernel)
    M[p] (O, tiles) = U[p] · V[p] for the 36 points p                       (BatchMatMul)
    y               = output transform Aᵀ M A of every tile, cropped        (C++ kernel)

The backward pass is the exact adjoint: ``dM = A dY Aᵀ``, ``dU[p] = dM[p] · V[p]ᵀ``,
``dV[p] = U[p]ᵀ · dM[p]``, ``dx = B dV Bᵀ`` scattered back over the overlapping tiles,
``dg = Gᵀ dU G``. V is recomputed in the backward pass instead of being kept alive.

The tile tensors are split into chunks of at most `TILE_CHUNK` tiles, one MindSpore tensor per
chunk: MindSpore 2.10's CPU BatchMatMul runs at 160-190 GFLOP/s on (36, 256, 256) x (36, 256,
2048) here but about 100 at 12,544 columns, and concatenating or slicing the large tensors
copies at a few hundred MB/s. The transforms are the C++ kernels of
``kernels/cpu/winograd_conv3x3.cc``, called as MindSpore AOT custom operators; everything is
float32 NCHW. Results match the direct convolution to float32 rounding (about 1e-6 relative,
Winograd's transforms add a little error of their own). The products stay float32 under
``hardware.matmul_precision=bfloat16``: the transforms amplify rounding errors, and bfloat16
operands gave 2.5e-2 RMS relative error here (2.4e-3 for a direct convolution), for a step
only about 0.2 s faster at 512² (measured).
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Tuple

import mindspore as ms
from mindspore import Tensor, nn, ops

from instaboost.models.layers.native_kernels import aot_op, kernel_library

OUTPUT_TILE = 4                       # m of F(m, 3)
INPUT_TILE = OUTPUT_TILE + 2          # a = m + r - 1
POINTS = INPUT_TILE * INPUT_TILE      # 36 products per tile
# Tiles per BatchMatMul (see the module docstring for the measurement behind it).
TILE_CHUNK = 2048
# Most images across one canvas (kMaxCanvasColumns of the kernel source).
MAX_CANVAS_COLUMNS = 8
_LIBRARY = "winograd_conv3x3"
_OP_CACHE_SIZE = 256


class Canvas(NamedTuple):
    """How a batch of images lies on canvases: ``columns`` x ``rows`` image slots each."""

    columns: int
    rows: int
    count: int
    tiles_y: int
    tiles_x: int

    @property
    def tiles(self) -> int:
        return self.count * self.tiles_y * self.tiles_x


def choose_canvas(batch: int, height: int, width: int) -> Canvas:
    """The kernel's layout (``ChooseCanvas`` in kernels/cpu/winograd_conv3x3.cc, which rejects
    tile tensors sized for another): separate images, unless laying them side by side on one
    canvas, one zero pixel apart, needs strictly fewer tiles. Small maps overhang their tiles:
    a 14x14 RoI alone is 16 tiles (16x16 outputs), four across a canvas 14.1."""
    best = Canvas(1, 1, batch, -(-height // OUTPUT_TILE), -(-width // OUTPUT_TILE))
    for columns in range(1, min(batch, MAX_CANVAS_COLUMNS) + 1):
        rows = -(-batch // columns)
        shared = Canvas(columns, rows, 1, -(-(rows * (height + 1) - 1) // OUTPUT_TILE),
                        -(-(columns * (width + 1) - 1) // OUTPUT_TILE))
        if shared.tiles < best.tiles:
            best = shared
    return best


def tile_chunks(batch: int, height: int, width: int) -> Tuple[int, ...]:
    """Tiles in each chunk of a (batch, ., height, width) input; all but the last are full."""
    tiles = choose_canvas(batch, height, width).tiles
    full, rest = divmod(tiles, TILE_CHUNK)
    return (TILE_CHUNK,) * full + ((rest,) if rest else ())


class _TransformOps(NamedTuple):
    """AOT operators of one (batch, C, O, H, W) configuration."""

    input: ops.Custom            # x -> (V_0, ..., V_k)
    output: ops.Custom           # (x, M_0, ..., M_k) -> y        (x only for its shape)
    input_adjoint: ops.Custom    # (x, dV_0, ..., dV_k) -> dx     (x only for its shape)
    output_adjoint: ops.Custom   # dy -> (dM_0, ..., dM_k)


def _custom(function: str, shapes: List[Tuple[int, ...]]) -> ops.Custom:
    """An AOT op of ``kernels/cpu/winograd_conv3x3.cc`` with fixed output shapes.

    MindSpore caches an AOT op's inferred output shape by the op's input shapes, so every op's
    inputs must determine its outputs: the output transform and the input adjoint therefore
    also take the convolution input x (not read), see the kernel source.
    """
    single = len(shapes) == 1
    out_shape = shapes[0] if single else tuple(shapes)
    out_dtype = ms.float32 if single else tuple(ms.float32 for _ in shapes)
    return aot_op(_LIBRARY, function, lambda *_: out_shape, lambda *_: out_dtype)


@functools.lru_cache(maxsize=None)
def weight_ops() -> Tuple[ops.Custom, ops.Custom]:
    """(G g Gᵀ: (O, C, 3, 3) -> U (36, O, C), its adjoint: dU -> dg (O, C, 3, 3))."""
    return (aot_op(_LIBRARY, "WinogradF4Weight", lambda g: (POINTS, g[0], g[1]), lambda d: d),
            aot_op(_LIBRARY, "WinogradF4WeightAdjoint", lambda u: (u[1], u[2], 3, 3),
                   lambda d: d))


@functools.lru_cache(maxsize=_OP_CACHE_SIZE)
def transform_ops(batch: int, in_channels: int, out_channels: int, height: int,
                  width: int) -> _TransformOps:
    """The four transform operators for inputs (batch, in_channels, height, width)."""
    chunks = tile_chunks(batch, height, width)
    input_chunks = [(POINTS, in_channels, tiles) for tiles in chunks]
    output_chunks = [(POINTS, out_channels, tiles) for tiles in chunks]
    return _TransformOps(
        input=_custom("WinogradF4Input", input_chunks),
        output=_custom("WinogradF4Output", [(batch, out_channels, height, width)]),
        input_adjoint=_custom("WinogradF4InputAdjoint", [(batch, in_channels, height, width)]),
        output_adjoint=_custom("WinogradF4OutputAdjoint", output_chunks))


def _as_tuple(result) -> Tuple[Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


class WinogradConvFunction(nn.Cell):
    """y = conv3x3(x, weight), stride 1, padding 1, no bias, by Winograd F(4, 3).

    Inputs: x float32 (N, C, H, W); weight float32 (O, C, 3, 3). Output float32 (N, O, H, W).
    """

    def __init__(self):
        super().__init__()
        kernel_library(_LIBRARY)  # build (or find) the C++ kernels now: errors surface at build
        self.weight_transform, self.weight_adjoint = weight_ops()

    def _ops(self, x: Tensor, weight: Tensor) -> _TransformOps:
        n, c, h, w = x.shape
        return transform_ops(n, c, weight.shape[0], h, w)

    def construct(self, x: Tensor, weight: Tensor) -> Tensor:
        transforms = self._ops(x, weight)
        u = self.weight_transform(weight)
        products = [ops.BatchMatMul()(u, v) for v in _as_tuple(transforms.input(x))]
        return transforms.output(x, *products)

    def bprop(self, x: Tensor, weight: Tensor, out: Tensor, dout: Tensor):
        transforms = self._ops(x, weight)
        u = self.weight_transform(weight)
        dproducts = _as_tuple(transforms.output_adjoint(dout))
        inputs = _as_tuple(transforms.input(x))
        du = None
        dinputs = []
        for v, dm in zip(inputs, dproducts):
            part = ops.BatchMatMul(transpose_b=True)(dm, v)                  # (36, O, C)
            du = part if du is None else du + part
            dinputs.append(ops.BatchMatMul(transpose_a=True)(u, dm))         # (36, C, tiles)
        dx = transforms.input_adjoint(x, *dinputs)
        return dx, self.weight_adjoint(du)

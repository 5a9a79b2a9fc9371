"""3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering on the CPU.

A 3x3 convolution costs 9 multiply-adds per output pixel and channel pair. F(m x m, 3 x 3)
computes an m x m output tile from an a x a input tile, a = m + 2, with a² products: F4 (m = 4)
36 per 16 pixels, 2.25 per pixel; F6 (m = 6) 64 per 36 pixels, 1.78 per pixel. Maps that are
not a multiple of m overhang their last tiles; `choose_layout` takes, per input shape, the
tiling of least cost, products plus weight-domain work: F6 on the detector's 128² and 64² maps
(18% and 16% fewer products than F4), F4 on 32² and smaller (F6's larger weight transforms
outweigh its 8% fewer products at 32², measured). Small maps, such as the mask head's 14x14
RoIs, are laid side by side on one canvas with one zero pixel between them (`choose_canvas`): 128 RoIs are 800 F6
tiles, 51,200 products per channel pair, where 2,048 F4 tiles, one 16x16 block per RoI, were
73,728 (-31%). Per batch:

    V[p] (C, tiles) = input transform  Bᵀ d B of every a x a tile d of x    (C++ kernel)
    U[p] (O, C)     = weight transform G g Gᵀ of every 3x3 filter g        (C++ kernel)
    M[p] (O, tiles) = U[p] · V[p] for the a² points p               (C++ matmul, float32)
    y               = output transform Aᵀ M A of every tile, cropped        (C++ kernel)

The backward pass is the exact adjoint: ``dM = A dY Aᵀ``, ``dU[p] = dM[p] · V[p]ᵀ``,
``dV[p] = U[p]ᵀ · dM[p]``, ``dx = B dV Bᵀ`` scattered back over the overlapping tiles,
``dg = Gᵀ dU G``. `WinogradConvFunction`, which the layers use, recomputes U and V in its
backward pass instead of keeping them alive. Every operator also differentiates itself with its
adjoint kernel (`winograd_conv3x3`, the same gradients): the form MindSpore can differentiate
under a traced forward (README, Known limits).

The tile tensors are split into chunks of at most `TILE_CHUNK` tiles, one MindSpore tensor per
chunk: concatenating or slicing the large tensors copies at a few hundred MB/s, and MindSpore's
BatchMatMul, which ran the products first, slows down above a few thousand columns. The
products run on the C++ matmul kernel of ``gemm.py``, always in float32: alone it is a little
slower than MindSpore 2.10's CPU BatchMatMul (170-191 vs 195-211 GFLOP/s on (36 or 64, 256,
256) x (., 256, 800-2048)), but inside the train step its products took 10-15% less time
(measured: the step's Winograd products summed 0.95-1.14 s with 700-900 mask-head tiles vs
1.09-1.43 s at 600-800 on BatchMatMul, bfloat16 step, six steps of each in alternating runs).
The transforms are the C++ kernels of ``kernels/cpu/winograd_conv3x3.cc``, called as MindSpore
AOT custom operators; everything is float32 NCHW. Results match the direct convolution to
float32 rounding plus the transforms' own error, measured against a float64 direct convolution
with 256 input channels: RMS relative error 2.3e-6 with F4, 4.4e-6 with F6, 2.9e-7 for a float32
direct convolution (max 7.7e-6 / 1.3e-5). The products stay float32 under
``hardware.matmul_precision=bfloat16``: the transforms amplify rounding errors, and bfloat16
operands gave 2.5e-2 RMS relative error with F4 and 4.7e-2 with F6, in the output and in both
gradients alike (2.4e-3 for a direct convolution).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Tuple

import mindspore as ms
from mindspore import Tensor, nn, ops

from instaboost.models.layers.gemm import kernel_op
from instaboost.models.layers.native_kernels import aot_op, kernel_library

# Tiles per batched product (see the module docstring for the measurement behind it).
TILE_CHUNK = 2048
# Most images across one canvas (kMaxCanvasColumns of the kernel source).
MAX_CANVAS_COLUMNS = 8
# The weight-domain work of one weight point (U = G g Gᵀ twice, forward and backward, and its
# adjoint once: memory-bound, 2.1 ns per point and channel pair measured with F6 at 256 x 256) in
# products of the same pair (three per product, fwd, dU and dV, 0.04 ns at ~150 GFLOP/s).
WEIGHT_POINT_COST = 50
_LIBRARY = "winograd_conv3x3"
# Input shapes whose layout is remembered: every Winograd call asks for it, forward and backward.
_LAYOUT_CACHE_SIZE = 256


class Tiling(NamedTuple):
    """F(m x m, 3 x 3): m x m output tiles from (m + 2) x (m + 2) input tiles, one product each."""

    name: str            # prefix of the kernel's entry points
    output_tile: int     # m

    @property
    def points(self) -> int:
        return (self.output_tile + 2) ** 2


F4 = Tiling("F4", 4)
F6 = Tiling("F6", 6)
TILINGS = (F4, F6)


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


class Layout(NamedTuple):
    """The tiling and canvas of one input shape, and the tiles of each product's chunk."""

    tiling: Tiling
    canvas: Canvas

    @property
    def chunks(self) -> Tuple[int, ...]:
        full, rest = divmod(self.canvas.tiles, TILE_CHUNK)
        return (TILE_CHUNK,) * full + ((rest,) if rest else ())

    @property
    def products(self) -> int:
        """Products per (input channel, output channel) pair."""
        return self.canvas.tiles * self.tiling.points

    @property
    def cost(self) -> int:
        """Products plus the weight-domain work, per channel pair (see WEIGHT_POINT_COST)."""
        return self.products + WEIGHT_POINT_COST * self.tiling.points


def choose_canvas(batch: int, height: int, width: int, tiling: Tiling = F4) -> Canvas:
    """The kernel's canvas (``ChooseCanvas`` in kernels/cpu/winograd_conv3x3.cc, which rejects
    tile tensors sized for another): separate images, unless laying them side by side on one
    canvas, one zero pixel apart, needs strictly fewer tiles. Small maps overhang their tiles:
    a 14x14 RoI alone is 16 F4 tiles (16x16 outputs), three across a canvas 13.8."""
    m = tiling.output_tile
    best = Canvas(1, 1, batch, -(-height // m), -(-width // m))
    for columns in range(1, min(batch, MAX_CANVAS_COLUMNS) + 1):
        rows = -(-batch // columns)
        shared = Canvas(columns, rows, 1, -(-(rows * (height + 1) - 1) // m),
                        -(-(columns * (width + 1) - 1) // m))
        if shared.tiles < best.tiles:
            best = shared
    return best


@functools.lru_cache(maxsize=_LAYOUT_CACHE_SIZE)
def choose_layout(batch: int, height: int, width: int) -> Layout:
    """The tiling of least cost for this shape (F4 on a tie: its transforms are cheaper and more
    accurate), on its best canvas. F6's 64 weight points cost more than F4's 36 whatever the
    input: measured fwd+bwd per convolution, F4 vs F6, (2, 256, 32, 32) 23.5 vs 26.9 ms although
    F6 has 8% fewer products, (2, 256, 48, 48) 43.7 vs 41.6 ms, (2, 128, 64, 64) 26.8 vs 25.9."""
    layouts = [Layout(tiling, choose_canvas(batch, height, width, tiling)) for tiling in TILINGS]
    return min(layouts, key=lambda layout: layout.cost)


class _TransformOps(NamedTuple):
    """AOT operators of every input shape whose layout has one tiling and chunk count."""

    input: ops.Custom            # x -> (V_0, ..., V_k)
    output: ops.Custom           # (x, M_0, ..., M_k) -> y        (x only for its shape)
    input_adjoint: ops.Custom    # (x, dV_0, ..., dV_k) -> dx     (x only for its shape)
    output_adjoint: ops.Custom   # dy -> (dM_0, ..., dM_k)
    weight: ops.Custom           # g (O, C, 3, 3) -> U (points, O, C)
    weight_adjoint: ops.Custom   # dU -> dg


def _one_or_tuple(items: list):
    return items[0] if len(items) == 1 else tuple(items)


def _chunk_shapes(batch: int, channels: int, height: int, width: int) -> list:
    """Shapes of the tile tensors (points, channels, tiles) of an input shape, in the (cached)
    layout that also picked the operators."""
    layout = choose_layout(batch, height, width)
    return [(layout.tiling.points, channels, tiles) for tiles in layout.chunks]


def _custom(function: str, out_shape, count: int = 1, bprop=None) -> ops.Custom:
    """A float32 AOT op of ``kernels/cpu/winograd_conv3x3.cc`` with ``count`` outputs whose
    shapes ``out_shape`` computes from the input shapes.

    MindSpore caches an AOT op's inferred output shape by the op's input shapes, so every op's
    inputs must determine its outputs: the output transform and the input adjoint therefore
    also take the convolution input x (not read), see the kernel source. The ops (and their
    bprops) hold nothing of one shape: the graph compiler reuses an operator's bprop graph for
    every call of that kernel function.
    """
    dtype = _one_or_tuple([ms.float32] * count)
    return aot_op(_LIBRARY, function, out_shape, lambda *_: dtype, bprop=bprop)


@functools.lru_cache(maxsize=None)
def weight_ops(tiling: Tiling) -> Tuple[ops.Custom, ops.Custom]:
    """(G g Gᵀ: (O, C, 3, 3) -> U (points, O, C), differentiable; its adjoint: dU -> dg)."""
    points = tiling.points
    adjoint = aot_op(_LIBRARY, f"Winograd{tiling.name}WeightAdjoint",
                     lambda u: (u[1], u[2], 3, 3), lambda d: d)

    def bprop(g, out, dout):
        return (adjoint(dout),)

    return (aot_op(_LIBRARY, f"Winograd{tiling.name}Weight", lambda g: (points, g[0], g[1]),
                   lambda d: d, bprop=bprop),
            adjoint)


@functools.lru_cache(maxsize=None)
def _chunked_ops(tiling: Tiling, chunks: int) -> _TransformOps:
    """The transform operators of every input shape whose layout has this tiling and chunk
    count, differentiable by themselves (each one's adjoint kernel is its backward)."""
    prefix = "Winograd" + tiling.name
    weight, weight_adjoint = weight_ops(tiling)
    input_adjoint = _custom(prefix + "InputAdjoint", lambda x, *_: tuple(x))
    output_adjoint = _custom(
        prefix + "OutputAdjoint", lambda dy: _one_or_tuple(_chunk_shapes(*dy)), chunks)

    # The graph compiler needs a bprop's parameters named: one, two and more chunks each have
    # their own (the last only runs in PyNative mode). x is an input for its shape only.
    def input_bprop_1(x, out, dout):                     # dx = B dV Bᵀ over the tiles
        return (input_adjoint(x, dout),)

    def input_bprop_2(x, out, dout):
        return (input_adjoint(x, dout[0], dout[1]),)

    def input_bprop_n(x, out, dout):
        return (input_adjoint(x, *dout),)

    def output_bprop_1(x, m0, out, dout):                # dM = A dY Aᵀ
        return ops.zeros_like(x), output_adjoint(dout)

    def output_bprop_2(x, m0, m1, out, dout):
        return (ops.zeros_like(x),) + output_adjoint(dout)

    def output_bprop_n(*args):                           # (x, M_0..M_k, out, dout)
        return (ops.zeros_like(args[0]),) + output_adjoint(args[-1])

    input_bprop = {1: input_bprop_1, 2: input_bprop_2}.get(chunks, input_bprop_n)
    output_bprop = {1: output_bprop_1, 2: output_bprop_2}.get(chunks, output_bprop_n)
    return _TransformOps(
        input=_custom(prefix + "Input", lambda x: _one_or_tuple(_chunk_shapes(*x)), chunks,
                      input_bprop),
        output=_custom(prefix + "Output", lambda x, m0, *_: (x[0], m0[1], x[2], x[3]),
                       bprop=output_bprop),
        input_adjoint=input_adjoint, output_adjoint=output_adjoint,
        weight=weight, weight_adjoint=weight_adjoint)


def transform_ops(batch: int, height: int, width: int) -> _TransformOps:
    """The transform operators for inputs (batch, any channels, height, width)."""
    layout = choose_layout(batch, height, width)
    return _chunked_ops(layout.tiling, len(layout.chunks))


def _product(a: Tensor, b: Tensor, transpose_a: bool = False, transpose_b: bool = False) -> Tensor:
    """The batched product of the a² points, always float32 (see the module docstring)."""
    return kernel_op(transpose_a, transpose_b, precision="float32")(a, b)


def _as_tuple(result) -> Tuple[Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def winograd_conv3x3(x: Tensor, weight: Tensor) -> Tensor:
    """y = conv3x3(x, weight), stride 1, padding 1, no bias, by Winograd (`choose_layout`).

    x float32 (N, C, H, W); weight float32 (O, C, 3, 3) -> float32 (N, O, H, W). Differentiable
    through its operators' own backward, which keeps U and the input tiles V for it (about
    0.75 GB more at 512², batch 2); `WinogradConvFunction` recomputes them instead (measured
    at the same speed in the train step).
    """
    n, _, h, w = x.shape
    transforms = transform_ops(n, h, w)
    u = transforms.weight(weight)
    products = [_product(u, v) for v in _as_tuple(transforms.input(x))]
    return transforms.output(x, *products)


class WinogradConvFunction(nn.Cell):
    """`winograd_conv3x3` with a backward that recomputes U and V instead of keeping them.

    Inputs: x float32 (N, C, H, W); weight float32 (O, C, 3, 3). Output float32 (N, O, H, W).
    """

    def __init__(self):
        super().__init__()
        kernel_library(_LIBRARY)  # build (or find) the C++ kernels now: errors surface at build

    def _ops(self, x: Tensor, weight: Tensor) -> _TransformOps:
        n, _, h, w = x.shape
        return transform_ops(n, h, w)

    def construct(self, x: Tensor, weight: Tensor) -> Tensor:
        return winograd_conv3x3(x, weight)

    def bprop(self, x: Tensor, weight: Tensor, out: Tensor, dout: Tensor):
        transforms = self._ops(x, weight)
        u = transforms.weight(weight)
        dproducts = _as_tuple(transforms.output_adjoint(dout))
        inputs = _as_tuple(transforms.input(x))
        du = None
        dinputs = []
        for v, dm in zip(inputs, dproducts):
            part = _product(dm, v, transpose_b=True)                        # (a², O, C)
            du = part if du is None else du + part
            dinputs.append(_product(u, dm, transpose_a=True))               # (a², C, tiles)
        dx = transforms.input_adjoint(x, *dinputs)
        return dx, transforms.weight_adjoint(du)

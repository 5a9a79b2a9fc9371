"""Convolution factory with fast CPU paths ("unfold", "winograd") next to MindSpore's kernels.

MindSpore 2.10's native CPU 3x3 convolution runs at about 1 GFLOP/s (0.5-1.3 measured),
forward and backward alike. ``impl="unfold"`` computes the same convolution with row gathers
(im2col) and matrix products, which run at matmul speed. ``impl="winograd"`` additionally runs
every 3x3 / stride 1 / padding 1 convolution (most of a Mask R-CNN's arithmetic) as Winograd
F(4x4, 3x3) with C++ transform kernels (`WinogradConv2d`, winograd.py): 2.25 instead of 9
multiplies per output, 3-4x faster than unfold on those layers. All implementations hold the same
parameters under the same names and shapes (``weight`` (O, C/groups, kh, kw), ``bias`` (O,);
for the 2x2 deconvolution ``weight`` (C, O, 2, 2) like ``nn.Conv2dTranspose``), so checkpoints
move freely between them.

The unfold path (NCHW in, NCHW out, float32) is designed around what is fast on MindSpore's CPU
backend: matmuls in any transposition, ``ops.gather`` of whole rows along axis 0 (several GB/s),
concatenation of contiguous blocks; and around what is slow there: materialising strided views
(transposes, stepped slices, pads copy at a few hundred MB/s).

* Per chunk of images, the input is transposed once into a *row table*
  ``(G*n*H*W + 1, C/G)``: one row per pixel (and group) with its channels contiguous, plus a
  trailing zero row that stands for padding.
* A cached int32 index names, for every output pixel and kernel tap, the row it reads.
  ``ops.gather`` copies those rows into the patch matrix ``P`` (rows = output pixels,
  columns = (tap_y, tap_x, channel)).
* Forward ``Y (O, pixels) = Wm · Pᵀ`` is already NCHW (no output transpose); with several
  images per matmul the (O, image, pixel) result is put back in image order with one row gather.
* A custom ``bprop`` recomputes ``P`` instead of keeping it alive between forward and backward,
  computes ``dW = dY · P`` and ``dP = dYᵀ · Wm`` straight from the NCHW output gradient, and
  scatters ``dP`` onto the row table with ``unsorted_segment_sum`` over the same index (the
  adjoint of the gather); one transpose brings the table gradient back to NCHW. Nothing runs
  through the native convolution kernels, forward or backward.
* Work is split into chunks (several small images, one image, or one image and a subset of the
  kernel taps) so that one patch matrix stays below ``PATCH_CHUNK_BYTES``.
* 1x1 convolutions skip the gather: ``Y = W · X`` on the NCHW tensor (small images batched with
  row-gather re-ordering); stride 2 first subsamples with ``ops.strided_slice`` (with
  ``matmul_impl="kernel"``: the C++ subsampling kernel of ``kernels/cpu/subpixel.cc``).
* The 2x2 stride-2 deconvolution is one matmul to all four sub-pixel maps, one row gather and a
  0/1 interleave matmul (no 6-D transpose), with an exact adjoint as backward.
* ``matmul_impl="kernel"`` (what ``impl="winograd"`` builds) runs every product on the C++
  matmul kernel of gemm.py instead; as it takes a 2-D weight against a 3-D batch, 1x1
  convolutions (groups 1) become one batched product ``Y[n] = W · X[n]`` and the deconvolution
  one batched product plus the C++ sub-pixel interleave, with no re-ordering gathers at all.
  k x k convolutions (groups 1) take no row table either: one C++ im2col pass writes the
  batch's patch matrix ``(N, C*kh*kw, Ho, Wo)``, rows ordered like the weight's, and one
  batched product ``Y[n] = W · cols[n]`` is the NCHW output (`_Im2ColConvFunction`); only
  batches whose patches exceed ``PATCH_CHUNK_BYTES`` keep the chunked gather path.

Graph mode: with ``matmul_impl="kernel"`` the forward of every unfold cell compiles under
``ms.jit``, and so does the backward of the deconvolution; with MindSpore's matmul only the 1x1
and deconvolution forwards do (MindSpore 2.10's graph compiler fails on the k x k path's Python).
The convolution backward does not compile either way (the graph compiler fails on the
shape-dependent branches of its bprop), so train steps using these cells run in PyNative mode.
"""
from __future__ import annotations

import functools
import math
from typing import List, NamedTuple, Sequence, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeUniform, Uniform, initializer

from instaboost.models.layers.gemm import load_kernel, matmul
from instaboost.models.layers.native_kernels import adjoint_pair_op, aot_op
from instaboost.models.layers.winograd import WinogradConvFunction, choose_layout

CONV_IMPLS = ("native", "unfold", "winograd")
# What a convolution cell may apply after its bias (fused with it on the C++ kernels).
CONV_ACTIVATIONS = ("none", "relu")

# nn.Conv2d's default weight init in MindSpore 2.10: HeUniform(negative_slope=sqrt(5)); bias
# Uniform(1/sqrt(fan_in)).
_HE_UNIFORM_NEGATIVE_SLOPE = math.sqrt(5)
# Upper bound (bytes) of one patch matrix of the unfold path.
PATCH_CHUNK_BYTES = 192 * 1024 * 1024
# Images with at least this many output pixels get their own matmul (no re-ordering gathers);
# smaller images are batched into one matmul up to PATCH_CHUNK_BYTES.
MIN_PIXELS_PER_MATMUL = 1024
# 1x1 convolutions on smaller maps stay on the row-reordering path: the per-image products of
# the shared-weight path fill the kernel's 32-column register tiles poorly on a few pixels (6x6
# maps: 44% padding), and the 192-px demo step measured 5-10% slower with them.
MIN_SHARED_WEIGHT_PIXELS = 196
_FLOAT32_BYTES = 4
_INDEX_CACHE_SIZE = 512

IntOrPair = Union[int, Tuple[int, int]]


def _pair(value: IntOrPair, name: str) -> Tuple[int, int]:
    """Return ``(value, value)`` for an int, the pair itself for a 2-sequence."""
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _check_impl(impl: str) -> None:
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output size of a convolution along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


@functools.lru_cache(maxsize=None)
def _subsample_op() -> ops.Custom:
    """Differentiable AOT op ``x[:, :, ::2, ::2]`` of ``kernels/cpu/subpixel.cc``."""
    return adjoint_pair_op("subpixel", "Subsample2x2", "Subsample2x2Adjoint",
                           lambda x: (x[0], x[1], (x[2] + 1) // 2, (x[3] + 1) // 2))


def subsample(x: Tensor, stride: Tuple[int, int], use_kernel: bool = False) -> Tensor:
    """x[:, :, ::sh, ::sw] for NCHW x, differentiable on CPU.

    ``use_kernel`` (stride 2 only): the C++ kernel, one pass over memory each way. Otherwise the
    ``StridedSlice`` primitive: in MindSpore 2.10 the gradient of a stepped slice *view*
    (``x[:, :, ::2, ::2]``) fails on CPU, and ``max_pool2d(kernel 1, stride 2)`` has a
    pathologically slow backward (tens of seconds for a 32 MB map); StridedSlice itself copies
    element by element (11.5 ms forward, ~25 ms backward for a (2, 256, 128, 128) map).
    """
    if tuple(stride) == (1, 1):
        return x
    if use_kernel and tuple(stride) == (2, 2):
        return _subsample_op()(x)
    return ops.strided_slice(x, (0, 0, 0, 0), tuple(x.shape), (1, 1) + tuple(stride))


@functools.lru_cache(maxsize=None)
def _bias_op(activation: str) -> ops.Custom:
    """Differentiable AOT op ``activation(x + bias[c])`` of ``kernels/cpu/bias.cc``. Its gradient
    sums dy (through the ReLU: where the output is positive) per channel on every core for the
    bias, and passes it on to x."""
    if activation == "relu":
        backward = aot_op("bias", "ChannelBiasReluGrad",
                          out_shape=lambda dy, _: (tuple(dy), (dy[1],)),
                          out_dtype=lambda dy, _: (dy, dy))

        def bprop(x, bias, out, dout):
            return backward(dout, out)
    else:
        channel_sum = aot_op("bias", "ChannelSum", out_shape=lambda dy: (dy[1],),
                             out_dtype=lambda dy: dy)

        def bprop(x, bias, out, dout):
            return dout, channel_sum(dout)

    entry = "ChannelBiasRelu" if activation == "relu" else "ChannelBiasAdd"
    return aot_op("bias", entry, out_shape=lambda x, _: tuple(x), out_dtype=lambda x, _: x,
                  bprop=bprop)


def _check_activation(activation: str) -> None:
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")


def add_bias(x: Tensor, bias: Tensor, activation: str = "none",
             use_kernel: bool = False) -> Tensor:
    """``activation(x + bias)``, the bias along axis 1 of NCHW x; differentiable.

    ``use_kernel``: one C++ operator for both, whose gradient sums the channels on every core;
    MindSpore's CPU BiasAddGrad sums them on one (8.3 against 1.0 ms for a (2, 256, 128, 128)
    map), and its ReLU and ReluGrad are two more passes over memory. An empty batch always takes
    MindSpore's operators.
    """
    if use_kernel and x.shape[0] > 0:
        return _bias_op(activation)(x, bias)
    y = ops.bias_add(x, bias)
    return ops.relu(y) if activation == "relu" else y


# --------------------------------------------------------------------------------------------
# Work plan: which images / taps go into one matmul, with their cached gather indices
# --------------------------------------------------------------------------------------------
class _Chunk(NamedTuple):
    """One matmul's worth of work: images ``first .. first+count-1``, kernel taps
    ``taps[0] .. taps[0]+taps[1]-1``.

    index: int32 (G, count*pixels, tap_count) rows of the chunk's own row table (its ``count``
        images, see `_to_row_table`), ordered (group, image, output pixel, tap); None for 1x1
        convolutions (no gather). Chunks with the same count and taps share one index.
    to_images: int32 row permutation (G*Og*count,) that turns (G, Og, count, P) into
        (count, G, Og, P); None when count == 1.
    to_groups: the inverse permutation ((count, G, Og) rows -> (G, Og, count)); None if count==1.
    in_to_images, in_to_groups: the same two permutations over input channels (G, Cg, count),
        used by 1x1 convolutions.
    """

    first: int
    count: int
    taps: Tuple[int, int]
    index: Union[Tensor, None]
    to_images: Union[Tensor, None]
    to_groups: Union[Tensor, None]
    in_to_images: Union[Tensor, None]
    in_to_groups: Union[Tensor, None]


class _Plan(NamedTuple):
    out_h: int
    out_w: int
    chunks: Tuple[_Chunk, ...]


@functools.lru_cache(maxsize=_INDEX_CACHE_SIZE)
def _patch_index(groups: int, count: int, height: int, width: int, kernel: Tuple[int, int],
                 stride: Tuple[int, int], padding: Tuple[int, int],
                 taps: Tuple[int, int]) -> Tensor:
    """Row-table index of every (group, image, output pixel, tap) of ``count`` images.

    The row table holds ``groups*count*height*width`` pixel rows ordered (group, image, y, x)
    followed by one zero row (index ``groups*count*height*width``) used for padding.

    Returns:
        int32 Tensor (G, count * Ho*Wo, tap_count), ordered (group, image, pixel, tap): a
        gather of the row table by it is the patch matrix (G, m, taps, C/G), with no reshape
        (a reshaped view is copied in full before it reaches the matmul kernel).
    """
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    out_h = conv_output_size(height, kh, sh, ph)
    out_w = conv_output_size(width, kw, sw, pw)
    ys = np.arange(out_h)[:, None] * sh - ph + np.arange(kh)[None, :]      # (Ho, kh)
    xs = np.arange(out_w)[:, None] * sw - pw + np.arange(kw)[None, :]      # (Wo, kw)
    valid = (((ys >= 0) & (ys < height))[:, None, :, None]
             & ((xs >= 0) & (xs < width))[None, :, None, :])                # (Ho, Wo, kh, kw)
    pixel = ys[:, None, :, None] * width + xs[None, :, None, :]
    pixel = pixel.reshape(out_h * out_w, kh * kw)[:, taps[0]:taps[0] + taps[1]]
    valid = valid.reshape(out_h * out_w, kh * kw)[:, taps[0]:taps[0] + taps[1]]
    zero_row = groups * count * height * width
    base = np.arange(groups * count).reshape(groups, count) * (height * width)
    index = base[:, :, None, None] + pixel[None, None]                     # (G, n, HoWo, t)
    index = np.where(valid[None, None], index, zero_row)
    return Tensor(index.reshape(groups, count * out_h * out_w, -1).astype(np.int32))


@functools.lru_cache(maxsize=_INDEX_CACHE_SIZE)
def _permutations(groups: int, out_per_group: int, count: int):
    """Row permutations between (G, Og, count) and (count, G, Og) orderings (None if count 1)."""
    if count == 1:
        return None, None
    g, o, i = np.meshgrid(np.arange(groups), np.arange(out_per_group), np.arange(count),
                          indexing="ij")
    group_major = ((g * out_per_group + o) * count + i)                   # position in (G,Og,n)
    image_major = ((i * groups + g) * out_per_group + o)                  # position in (n,G,Og)
    to_images = np.empty(group_major.size, np.int32)
    to_images[image_major.reshape(-1)] = group_major.reshape(-1)
    to_groups = np.empty(group_major.size, np.int32)
    to_groups[group_major.reshape(-1)] = image_major.reshape(-1)
    return Tensor(to_images), Tensor(to_groups)


@functools.lru_cache(maxsize=_INDEX_CACHE_SIZE)
def _make_plan(groups: int, batch: int, height: int, width: int, channels_per_group: int,
               out_per_group: int, kernel: Tuple[int, int], stride: Tuple[int, int],
               padding: Tuple[int, int], chunk_bytes: int) -> _Plan:
    """Split a convolution into matmul chunks under ``chunk_bytes`` of patches each.

    Images with at least MIN_PIXELS_PER_MATMUL output pixels get their own chunks (split further
    by kernel taps when one image's patches exceed ``chunk_bytes``); smaller images are batched.
    """
    kh, kw = kernel
    out_h = conv_output_size(height, kh, stride[0], padding[0])
    out_w = conv_output_size(width, kw, stride[1], padding[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"input {height}x{width} is smaller than kernel {kernel} "
                         f"with padding {padding}")
    pixels = out_h * out_w
    taps = kh * kw
    pointwise = kernel == (1, 1) and padding == (0, 0)
    tap_bytes = groups * pixels * channels_per_group * _FLOAT32_BYTES
    image_bytes = tap_bytes * taps
    ranges: List[Tuple[int, int, Tuple[int, int]]] = []
    if pixels >= MIN_PIXELS_PER_MATMUL or batch == 1:
        tap_ranges = [(0, taps)]
        if image_bytes > chunk_bytes and not pointwise:
            per_chunk = max(1, chunk_bytes // tap_bytes)
            tap_ranges = [(t, min(per_chunk, taps - t)) for t in range(0, taps, per_chunk)]
        ranges = [(image, 1, tap_range) for image in range(batch) for tap_range in tap_ranges]
    else:
        per_chunk = batch if pointwise else max(1, min(batch, chunk_bytes // image_bytes))
        ranges = [(first, min(per_chunk, batch - first), (0, taps))
                  for first in range(0, batch, per_chunk)]
    chunks = []
    for first, count, tap_range in ranges:
        index = None if pointwise else _patch_index(groups, count, height, width, kernel,
                                                    stride, padding, tap_range)
        to_images, to_groups = _permutations(groups, out_per_group, count)
        in_to_images, in_to_groups = (_permutations(groups, channels_per_group, count)
                                      if pointwise else (None, None))
        chunks.append(_Chunk(first, count, tap_range, index, to_images, to_groups,
                             in_to_images, in_to_groups))
    return _Plan(out_h, out_w, tuple(chunks))


# --------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------
# The layout kernels differentiate themselves (each is the other's adjoint, up to the row
# table's zero row), so that a forward made of them needs no bprop cell.
@functools.lru_cache(maxsize=None)
def _swap_last_axes_op() -> ops.Custom:
    def bprop(x, out, dout):
        return (_swap_last_axes_op()(dout),)

    return aot_op("transpose", "SwapLastAxes", out_shape=lambda s: tuple(s[:-2]) + (s[-1], s[-2]),
                  out_dtype=lambda d: d, bprop=bprop)


@functools.lru_cache(maxsize=None)
def _row_table_op() -> ops.Custom:
    def bprop(x, out, dout):
        n, c, h, w = x.shape
        return (_row_table_to_nchw(dout, 1, n, c, h, w, use_kernel=True),)

    return aot_op("transpose", "ToRowTable",
                  out_shape=lambda s: (s[0] * math.prod(s[2:]) + 1, s[1]), out_dtype=lambda d: d,
                  bprop=bprop)


def _swap_last_axes(x: Tensor, use_kernel: bool) -> Tensor:
    """(..., R, C) -> (..., C, R). ``use_kernel``: the C++ blocked transpose of
    ``kernels/cpu/transpose.cc``, about 10x faster than MindSpore's strided copy, which the
    reshape after ``ops.transpose`` runs (measured: a 512x512x3x3 weight 11.4 ms)."""
    return _swap_last_axes_op()(x) if use_kernel else ops.swapaxes(x, -1, -2)


def _to_row_table(x: Tensor, groups: int, use_kernel: bool = False) -> Tensor:
    """(n, C, H, W) -> row table (G*n*H*W + 1, C/G) ordered (group, image, pixel); last row 0."""
    n, c, h, w = x.shape
    cg = c // groups
    if groups == 1 and use_kernel:
        return _row_table_op()(x)          # the zero row written in the same pass, x unreshaped
    if groups == 1:
        rows = ops.transpose(x.reshape(n, c, h * w), (0, 2, 1)).reshape(n * h * w, c)
    else:
        rows = ops.transpose(x.reshape(n, groups, cg, h * w), (1, 0, 3, 2))
        rows = rows.reshape(groups * n * h * w, cg)
    return ops.concat([rows, ops.zeros((1, cg), x.dtype)], 0)


def _row_table_to_nchw(table: Tensor, groups: int, n: int, c: int, h: int, w: int,
                       use_kernel: bool = False) -> Tensor:
    """Inverse of `_to_row_table` (drops the zero row): -> (N, C, H, W)."""
    cg = c // groups
    rows = table[:-1]
    if groups == 1:
        out = _swap_last_axes(rows.reshape(n, h * w, c), use_kernel)
    else:
        out = ops.transpose(rows.reshape(groups, n, h * w, cg), (1, 0, 3, 2))
    return out.reshape(n, c, h, w)


def _weight_matrix(weight: Tensor, groups: int, taps: Tuple[int, int],
                   use_kernel: bool = False) -> Tensor:
    """(O, Cg, kh, kw) -> (G, Og, tap_count, Cg), which the matmuls read as the weight matrix
    (G, Og, tap_count*Cg) with columns ordered (tap, channel)."""
    o, cg, kh, kw = weight.shape
    wmat = _swap_last_axes(weight.reshape(groups, o // groups, cg, kh * kw), use_kernel)
    if taps != (0, kh * kw):
        wmat = wmat[:, :, taps[0]:taps[0] + taps[1]]
    return wmat


def _weight_from_matrix(wmat: Tensor, weight_shape: Tuple[int, ...],
                        use_kernel: bool = False) -> Tensor:
    """Inverse of `_weight_matrix` over all taps: (G, Og, kh*kw, Cg) -> (O, Cg, kh, kw)."""
    return _swap_last_axes(wmat, use_kernel).reshape(weight_shape)


def _reorder_rows(x: Tensor, permutation: Union[Tensor, None], shape: Tuple[int, ...]) -> Tensor:
    """Gather whole rows of a (rows, P) view of ``x`` and reshape; identity when None."""
    if permutation is None:
        return x.reshape(shape)
    return ops.gather(x.reshape(-1, x.shape[-1]), permutation, 0).reshape(shape)


def _output_to_group_major(dout: Tensor, chunk: _Chunk, groups: int) -> Tensor:
    """dY of a chunk's images (count, O, P) -> (G, Og, count*P)."""
    count, o, pixels = dout.shape
    rows = _reorder_rows(dout.reshape(count * o, pixels), chunk.to_groups,
                         (groups * (o // groups) * count, pixels))
    return rows.reshape(groups, o // groups, count * pixels)


def _group_major_to_output(y: Tensor, chunk: _Chunk, pixels: int,
                           inputs: bool = False) -> Tensor:
    """(G, Og, count*P) -> (count, O, P) (over input channels when ``inputs``)."""
    g, og, _ = y.shape
    permutation = chunk.in_to_images if inputs else chunk.to_images
    rows = _reorder_rows(y.reshape(g * og * chunk.count, pixels), permutation,
                         (chunk.count * g * og, pixels))
    return rows.reshape(chunk.count, g * og, pixels)


def _sum(parts: List[Tensor]) -> Tensor:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


# --------------------------------------------------------------------------------------------
# Differentiable kernels (custom bprop; the weight is an input, the cells hold no parameters)
# --------------------------------------------------------------------------------------------
class _UnfoldConvFunction(nn.Cell):
    """y = conv2d(x, weight) by row gather + matmul, with a recomputing custom backward.

    Inputs: x float32 (N, C, H, W), weight float32 (O, C/G, kh, kw).
    Output: float32 (N, O, Ho, Wo).
    """

    def __init__(self, kernel: Tuple[int, int], stride: Tuple[int, int],
                 padding: Tuple[int, int], groups: int, chunk_bytes: int = PATCH_CHUNK_BYTES,
                 matmul_impl: str = "mindspore"):
        super().__init__()
        self.matmul_impl = matmul_impl
        # The C++ kernels are built with the matmul one; they also do the layout changes.
        self.use_kernel = matmul_impl == "kernel"
        self.kernel = kernel
        self.stride = stride
        self.padding = padding
        self.groups = groups
        self.chunk_bytes = chunk_bytes
        # False: the input never needs a gradient (e.g. the image); bprop returns zeros for it
        # and skips dP and the scatter.
        self.input_grad = True

    def _plan(self, x: Tensor, weight: Tensor) -> _Plan:
        n, c, h, w = x.shape
        return _make_plan(self.groups, n, h, w, c // self.groups, weight.shape[0] // self.groups,
                          self.kernel, self.stride, self.padding, self.chunk_bytes)

    @staticmethod
    def _patches(table: Tensor, chunk: _Chunk) -> Tensor:
        """(G, count*pixels, tap_count, Cg) patches of one chunk: the matmuls read it as the
        (G, count*pixels, tap_count*Cg) patch matrix (gemm.py)."""
        return ops.gather(table, chunk.index, 0)

    def construct(self, x: Tensor, weight: Tensor) -> Tensor:
        n = x.shape[0]
        plan = self._plan(x, weight)
        pixels = plan.out_h * plan.out_w
        outputs = []
        table = None
        wmats = {}              # one weight matrix per tap range, shared by the image chunks
        for i, chunk in enumerate(plan.chunks):
            if i == 0 or chunk.first != plan.chunks[i - 1].first:
                table = _to_row_table(x[chunk.first:chunk.first + chunk.count], self.groups,
                                      self.use_kernel)
            if chunk.taps not in wmats:
                wmats[chunk.taps] = _weight_matrix(weight, self.groups, chunk.taps,
                                                   self.use_kernel)
            y = matmul(wmats[chunk.taps], self._patches(table, chunk), transpose_b=True,
                       impl=self.matmul_impl)                                      # (G,Og,nP)
            y = _group_major_to_output(y, chunk, pixels)                            # (n, O, P)
            if i > 0 and chunk.first == plan.chunks[i - 1].first:
                outputs[-1] = outputs[-1] + y          # another tap range of the same image
            else:
                outputs.append(y)
        out = outputs[0] if len(outputs) == 1 else ops.concat(outputs, 0)
        return out.reshape(n, weight.shape[0], plan.out_h, plan.out_w)

    def bprop(self, x: Tensor, weight: Tensor, out: Tensor, dout: Tensor):
        n, c, h, w = x.shape
        cg = c // self.groups
        plan = self._plan(x, weight)
        pixels = plan.out_h * plan.out_w
        dout = dout.reshape(n, weight.shape[0], pixels)
        dweights = {}
        wmats = {}
        dxs = []
        dtable = None
        table = None
        last = len(plan.chunks) - 1
        for i, chunk in enumerate(plan.chunks):
            first, count = chunk.first, chunk.count
            new_images = i == 0 or first != plan.chunks[i - 1].first
            if new_images:
                table = _to_row_table(x[first:first + count], self.groups, self.use_kernel)
            dy = _output_to_group_major(dout[first:first + count], chunk, self.groups)
            patches = self._patches(table, chunk)                        # (G, m, taps, Cg)
            dw = matmul(dy, patches, impl=self.matmul_impl)              # (G, Og, taps, Cg)
            dweights[chunk.taps] = dw if chunk.taps not in dweights else dweights[chunk.taps] + dw
            if not self.input_grad:
                continue
            if chunk.taps not in wmats:
                wmats[chunk.taps] = _weight_matrix(weight, self.groups, chunk.taps,
                                                   self.use_kernel)
            dpatches = matmul(dy, wmats[chunk.taps], transpose_a=True,
                              impl=self.matmul_impl)                     # (G, m, taps, Cg)
            part = ops.unsorted_segment_sum(dpatches.reshape(-1, cg), chunk.index.reshape(-1),
                                            table.shape[0])
            dtable = part if new_images else dtable + part
            if i == last or plan.chunks[i + 1].first != first:
                dxs.append(_row_table_to_nchw(dtable, self.groups, count, c, h, w,
                                              self.use_kernel))
        if self.input_grad:
            dx = dxs[0] if len(dxs) == 1 else ops.concat(dxs, 0)
        else:
            dx = ops.zeros_like(x)
        by_tap = [dweights[taps] for taps in sorted(dweights)]
        dwmat = by_tap[0] if len(by_tap) == 1 else ops.concat(by_tap, 2)
        return dx, _weight_from_matrix(dwmat, weight.shape, self.use_kernel)


@functools.lru_cache(maxsize=None)
def _patch_ops() -> Tuple[ops.Custom, ops.Custom]:
    """(Im2Col, Col2Im) AOT operators of ``kernels/cpu/im2col.cc``, whose output shapes follow
    from the input's and the geometry tensor's (`_geometry_tensor`)."""
    def cols_shape(x, geometry):
        (n, c, h, w), (kh, kw, sh, sw, ph, pw) = x, geometry
        ph, pw = ph - 1, pw - 1
        return (n, c * kh * kw, conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw))

    return (aot_op("im2col", "Im2Col", out_shape=cols_shape, out_dtype=lambda x, _: x),
            aot_op("im2col", "Col2Im", out_shape=lambda x, *_: tuple(x),
                   out_dtype=lambda x, *_: x))


def _geometry_tensor(kernel: Tuple[int, int], stride: Tuple[int, int],
                     padding: Tuple[int, int]) -> Tensor:
    """The im2col kernels' geometry as a float32 tensor's *shape*, (kh, kw, sh, sw, ph + 1,
    pw + 1); its (zero) values are not read. MindSpore infers an AOT op's output shape from its input
    shapes and caches it by entry point and input shapes, across operator instances: a geometry
    held in a tensor's values gave one convolution another's cached output shape."""
    shape = tuple(kernel) + tuple(stride) + tuple(p + 1 for p in padding)
    return Tensor(np.zeros(shape, np.float32))


class _Im2ColConvFunction(nn.Cell):
    """y = conv2d(x, weight), groups 1, as one C++ im2col pass and one product on the C++ matmul
    kernel, with a recomputing custom backward.

    The patch matrix ``cols`` (N, C*kh*kw, Ho, Wo) has rows ordered like the weight's
    (O, C, kh, kw) read as a (O, C*kh*kw) matrix, so ``Y[n] = W · cols[n]`` is the NCHW output
    and neither weight nor output changes layout; the backward is ``dW = Σn dY[n] · cols[n]ᵀ``
    and ``dx = col2im(Wᵀ · dY[n])``. The `_UnfoldConvFunction` path it replaces (row table, row
    gather, segment sum, transposes and MindSpore's copies of the views between them) took
    0.55 s of a 4.0 s train step at 512², batch 2, for 0.17 s of products. It needs the
    whole batch's patches in one tensor: `fits` says whether they stay within ``chunk_bytes``
    (larger inputs take the chunked gather path).

    Inputs: x float32 (N, C, H, W), weight float32 (O, C, kh, kw). Output (N, O, Ho, Wo).
    """

    def __init__(self, kernel: Tuple[int, int], stride: Tuple[int, int],
                 padding: Tuple[int, int], chunk_bytes: int = PATCH_CHUNK_BYTES):
        super().__init__()
        self.kernel = kernel
        self.stride = stride
        self.padding = padding
        self.chunk_bytes = chunk_bytes
        self.im2col, self.col2im = _patch_ops()
        self.geometry = _geometry_tensor(kernel, stride, padding)
        # False: the input never needs a gradient (e.g. the image); see disable_input_grad.
        self.input_grad = True

    def fits(self, input_shape: Sequence[int]) -> bool:
        """Whether an input of this (N, C, H, W) shape has an output and its patch matrix fits
        chunk_bytes (an input smaller than the kernel is for the gather path to refuse)."""
        n, c, h, w = input_shape
        sizes = [conv_output_size(size, k, s, p) for size, k, s, p in
                 zip((h, w), self.kernel, self.stride, self.padding)]
        patch_bytes = n * c * math.prod(self.kernel) * math.prod(sizes) * _FLOAT32_BYTES
        return min(sizes) > 0 and patch_bytes <= self.chunk_bytes

    @staticmethod
    def _flat_weight(weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)                      # (O, C*kh*kw)

    def construct(self, x: Tensor, weight: Tensor) -> Tensor:
        cols = self.im2col(x, self.geometry)
        return matmul(self._flat_weight(weight), cols, impl="kernel")

    def bprop(self, x: Tensor, weight: Tensor, out: Tensor, dout: Tensor):
        cols = self.im2col(x, self.geometry)
        dw = matmul(dout, cols, transpose_b=True, impl="kernel")             # (N, O, C*kh*kw)
        dw = dw.sum(0).reshape(weight.shape)
        if not self.input_grad:
            return ops.zeros_like(x), dw
        dcols = matmul(self._flat_weight(weight), dout, transpose_a=True, impl="kernel")
        return self.col2im(x, dcols, self.geometry), dw


class _PointwiseConvFunction(nn.Cell):
    """1x1 stride-1 convolution as matmuls on the NCHW tensor (no layout change).

    Inputs: x float32 (N, C, H, W), weight float32 (O, C/G, 1, 1). Output (N, O, H, W).
    """

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def _plan(self, x: Tensor, weight: Tensor) -> _Plan:
        n, c, h, w = x.shape
        return _make_plan(self.groups, n, h, w, c // self.groups, weight.shape[0] // self.groups,
                          (1, 1), (1, 1), (0, 0), PATCH_CHUNK_BYTES)

    def _inputs(self, x: Tensor, chunk: _Chunk) -> Tensor:
        """x of a chunk's images (count, C, P) -> (G, Cg, count*P)."""
        xs = x[chunk.first:chunk.first + chunk.count]
        count, c, pixels = xs.shape
        rows = _reorder_rows(xs.reshape(count * c, pixels), chunk.in_to_groups,
                             (c * count, pixels))
        return rows.reshape(self.groups, c // self.groups, count * pixels)

    def construct(self, x: Tensor, weight: Tensor) -> Tensor:
        n, c, h, w = x.shape
        o = weight.shape[0]
        plan = self._plan(x, weight)
        x3 = x.reshape(n, c, h * w)
        wmat = weight.reshape(self.groups, o // self.groups, c // self.groups)
        outputs = [_group_major_to_output(matmul(wmat, self._inputs(x3, chunk)), chunk, h * w)
                   for chunk in plan.chunks]
        out = outputs[0] if len(outputs) == 1 else ops.concat(outputs, 0)
        return out.reshape(n, o, h, w)

    def bprop(self, x: Tensor, weight: Tensor, out: Tensor, dout: Tensor):
        n, c, h, w = x.shape
        o = weight.shape[0]
        plan = self._plan(x, weight)
        x3 = x.reshape(n, c, h * w)
        dout = dout.reshape(n, o, h * w)
        wmat = weight.reshape(self.groups, o // self.groups, c // self.groups)
        dxs = []
        dweights = []
        for chunk in plan.chunks:
            dy = _output_to_group_major(dout[chunk.first:chunk.first + chunk.count], chunk,
                                        self.groups)                               # (G, Og, m)
            dweights.append(matmul(dy, self._inputs(x3, chunk), transpose_b=True))  # (G,Og,Cg)
            dx = matmul(wmat, dy, transpose_a=True)                                # (G, Cg, m)
            dxs.append(_group_major_to_output(dx, chunk, h * w, inputs=True))
        dx = dxs[0] if len(dxs) == 1 else ops.concat(dxs, 0)
        return dx.reshape(n, c, h, w), _sum(dweights).reshape(weight.shape)


def _shared_weight_pointwise(x: Tensor, weight: Tensor) -> Tensor:
    """1x1 stride-1 convolution (groups 1) as one batched product ``Y[n] = W · X[n]`` with the
    weight shared by all images, on the C++ matmul kernel (which takes a 2-D operand against a
    3-D one): no layout change at all, where `_PointwiseConvFunction` re-orders the rows of
    small images into one matrix (0.5 s per training step for the mask head's 28x28 RoIs).
    The kernel operator's own backward gives ``dX[n] = Wᵀ · dY[n]`` and ``dW = Σn dY[n] · X[n]ᵀ``.

    x float32 (N, C, H, W), weight float32 (O, C, 1, 1) -> (N, O, H, W).
    """
    # x goes to the kernel as it is, never reshaped (see gemm.py: MindSpore copies a reshaped
    # view in full first; measured 11% of this layer's CPU time).
    o, c = weight.shape[0], weight.shape[1]
    return matmul(weight.reshape(o, c), x, impl="kernel")


# --------------------------------------------------------------------------------------------
# Public cells
# --------------------------------------------------------------------------------------------
def _init_weight_and_bias(cell: nn.Cell, weight_shape: Sequence[int], fan_in: int,
                          has_bias: bool, bias_size: int) -> None:
    """Create ``weight``/``bias`` Parameters initialised exactly like MindSpore's nn.Conv2d."""
    cell.weight = Parameter(initializer(HeUniform(_HE_UNIFORM_NEGATIVE_SLOPE), list(weight_shape),
                                        ms.float32), name="weight")
    if has_bias:
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        cell.bias = Parameter(initializer(Uniform(bound), [bias_size], ms.float32), name="bias")
    else:
        cell.bias = None


class UnfoldConv2d(nn.Cell):
    """2-D convolution (NCHW) computed by im2col + matmul; drop-in for ``nn.Conv2d``.

    Parameters: ``weight`` float32 (O, C/groups, kh, kw), ``bias`` float32 (O,) when has_bias.
    Input float32 (N, C, H, W) -> output float32 (N, O, Ho, Wo),
    Ho = (H + 2*pad - kh) // stride + 1. ``chunk_bytes`` bounds the patch matrix of one matmul.
    ``matmul_impl``: "mindspore" (MindSpore's MatMul, no compiler needed) or "kernel" (the C++
    matmul kernel of gemm.py; 1x1 convolutions then run as one shared-weight batched product).
    ``activation`` ("none" or "relu") follows the bias (see `add_bias`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, *,
                 stride: IntOrPair = 1, padding: IntOrPair = 0, groups: int = 1,
                 has_bias: bool = False, chunk_bytes: int = PATCH_CHUNK_BYTES,
                 matmul_impl: str = "mindspore", activation: str = "none"):
        super().__init__()
        _check_activation(activation)
        if matmul_impl == "kernel":
            load_kernel()
            if has_bias:
                _bias_op(activation)   # built now: no compiler fails where the layer is made
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must "
                             f"be divisible by groups {groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.groups = groups
        self.has_bias = has_bias
        self.activation = activation
        kh, kw = self.kernel_size
        _init_weight_and_bias(self, (out_channels, in_channels // groups, kh, kw),
                              in_channels // groups * kh * kw, has_bias, out_channels)
        # A 1x1 convolution without padding is a strided subsampling + a pointwise matmul.
        self.pointwise = self.kernel_size == (1, 1) and self.padding == (0, 0)
        self.matmul_impl = matmul_impl
        # 1x1 convolutions on maps of at least MIN_SHARED_WEIGHT_PIXELS (after striding) run
        # as one shared-weight batched product on the C++ kernel; others on `self.function`.
        self.shared_weight = self.pointwise and matmul_impl == "kernel" and groups == 1
        if not self.pointwise:
            self.function = _UnfoldConvFunction(self.kernel_size, self.stride, self.padding,
                                                groups, chunk_bytes, matmul_impl)
        else:
            self.function = _PointwiseConvFunction(groups)
        # k x k convolutions (groups 1) on the C++ kernels: im2col + one product where the
        # batch's patches fit chunk_bytes, else `self.function`.
        self.patches = None
        if not self.pointwise and matmul_impl == "kernel" and groups == 1:
            self.patches = _Im2ColConvFunction(self.kernel_size, self.stride, self.padding,
                                               chunk_bytes)

    def convolve(self, x: Tensor) -> Tensor:
        """The convolution without bias."""
        if x.shape[0] == 0:   # no images (or RoIs): an empty output, as nn.Conv2d gives
            out_h, out_w = (conv_output_size(size, k, s, p) for size, k, s, p in
                            zip(x.shape[2:], self.kernel_size, self.stride, self.padding))
            return ops.zeros((0, self.out_channels, out_h, out_w), x.dtype)
        if self.pointwise:
            x = subsample(x, self.stride, use_kernel=self.matmul_impl == "kernel")
            if self.shared_weight and x.shape[2] * x.shape[3] >= MIN_SHARED_WEIGHT_PIXELS:
                return _shared_weight_pointwise(x, self.weight)
        if self.patches is not None and self.patches.fits(x.shape):
            return self.patches(x, self.weight)
        return self.function(x, self.weight)

    def construct(self, x: Tensor) -> Tensor:
        y = self.convolve(x)
        if self.bias is not None:
            return add_bias(y, self.bias, self.activation,
                            use_kernel=self.matmul_impl == "kernel")
        return ops.relu(y) if self.activation == "relu" else y

    def extend_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"groups={self.groups}, has_bias={self.has_bias}, matmul={self.matmul_impl}, "
                f"activation={self.activation}")


@functools.lru_cache(maxsize=_INDEX_CACHE_SIZE)
def _deconv_operands(batch: int, channels: int, out_channels: int, height: int, width: int,
                     factor: int):
    """Cached permutations / interleave matrix of `_Deconv2x2Function`.

    Returns Tensors: to_columns, to_images (int32 row permutations between (N, C) and (C, N)
    orderings of the input's H*W rows; None when N == 1), to_output, to_product (int32 row
    permutations between the product's (o, a, b, image, i) and the output's (image, o, i, a, b)
    orderings of W-float rows) and interleave (float32 (f*W, f*W) 0/1 matrix).
    """
    f = factor
    image, o, i, a, b = np.meshgrid(np.arange(batch), np.arange(out_channels), np.arange(height),
                                    np.arange(f), np.arange(f), indexing="ij")
    to_output = ((((o * f + a) * f + b) * batch + image) * height + i).reshape(-1).astype(np.int32)
    to_product = np.empty_like(to_output)
    to_product[to_output] = np.arange(to_output.size, dtype=np.int32)
    interleave = np.zeros((f * width, f * width), np.float32)
    j = np.arange(width)
    for sub in range(f):
        interleave[sub * width + j, f * j + sub] = 1.0
    to_images, to_columns = _permutations(1, channels, batch)
    return to_columns, to_images, Tensor(to_output), Tensor(to_product), Tensor(interleave)


class _Deconv2x2Function(nn.Cell):
    """Transposed convolution kernel f, stride f (no bias): x (N, C, H, W), weight (C, O, f, f)
    -> (N, O, f*H, f*W), ``y[n, o, f*i+a, f*j+b] = sum_c x[n, c, i, j] * weight[c, o, a, b]``.

    One matmul produces all f*f sub-pixel maps, ``Y (O*f*f, N*H*W) = Wᵀ · X``; one row gather
    moves whole W-float rows into output order and a (f*W, f*W) 0/1 matmul interleaves the
    columns (a 6-D transpose would copy the output through the slow strided-copy kernel). The
    backward is the exact adjoint of each step.
    """

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def _operands(self, x: Tensor, weight: Tensor):
        n, c, h, w = x.shape
        return _deconv_operands(n, c, weight.shape[1], h, w, self.factor)

    def construct(self, x: Tensor, weight: Tensor) -> Tensor:
        n, c, h, w = x.shape
        f = self.factor
        o = weight.shape[1]
        to_columns, _, to_output, _, interleave = self._operands(x, weight)
        columns = _reorder_rows(x.reshape(n * c, h * w), to_columns, (c, n * h * w))
        product = ops.MatMul(transpose_a=True)(weight.reshape(c, o * f * f), columns)
        rows = ops.gather(product.reshape(-1, w), to_output, 0).reshape(-1, f * w)
        return ops.matmul(rows, interleave).reshape(n, o, f * h, f * w)

    def bprop(self, x: Tensor, weight: Tensor, out: Tensor, dout: Tensor):
        n, c, h, w = x.shape
        f = self.factor
        o = weight.shape[1]
        to_columns, to_images, _, to_product, interleave = self._operands(x, weight)
        columns = _reorder_rows(x.reshape(n * c, h * w), to_columns, (c, n * h * w))
        rows = ops.MatMul(transpose_b=True)(dout.reshape(-1, f * w), interleave)
        dproduct = ops.gather(rows.reshape(-1, w), to_product, 0).reshape(o * f * f, n * h * w)
        dweight = ops.MatMul(transpose_b=True)(columns, dproduct).reshape(weight.shape)
        dcolumns = ops.matmul(weight.reshape(c, o * f * f), dproduct)              # (C, N*HW)
        dx = _reorder_rows(dcolumns.reshape(c * n, h * w), to_images, x.shape)
        return dx, dweight


@functools.lru_cache(maxsize=None)
def _interleave_op() -> ops.Custom:
    """Differentiable AOT op of ``kernels/cpu/subpixel.cc``: (N, O*4, H, W) -> (N, O, 2H, 2W),
    whose backward is the kernel's adjoint."""
    def image_shape(maps):
        n, o4, h, w = maps
        return (n, o4 // 4, 2 * h, 2 * w)

    def maps_shape(image):
        n, o, h, w = image
        return (n, 4 * o, h // 2, w // 2)

    def float32(_):
        return ms.float32

    adjoint = aot_op("subpixel", "Interleave2x2Adjoint", maps_shape, float32)

    def bprop(maps, out, dout):
        return (adjoint(dout),)

    return aot_op("subpixel", "Interleave2x2", image_shape, float32, bprop=bprop)


def _kernel_deconv2x2(x: Tensor, weight: Tensor) -> Tensor:
    """`_Deconv2x2Function` for factor 2 on the C++ kernels: one shared-weight batched product
    to the four sub-pixel maps, ``P[n] (O*4, H*W) = Wmᵀ · X[n]`` with ``Wm = weight`` viewed as
    (C, O*4), then the sub-pixel interleave of ``kernels/cpu/subpixel.cc``. No gather, no
    layout change (the row gather of `_Deconv2x2Function` copies 14-float rows for the mask
    head, 0.15-0.45 s per step measured). Backward: both operators' own, the exact adjoints.
    """
    # x goes to the kernels unreshaped (a reshaped view is copied first, gemm.py).
    c, o = weight.shape[0], weight.shape[1]
    maps = matmul(weight.reshape(c, o * 4), x, transpose_a=True, impl="kernel")  # (N, 4O, H, W)
    return _interleave_op()(maps)


class UnfoldDeconv2x2(nn.Cell):
    """Transposed convolution, kernel 2, stride 2, with bias, by matmul + sub-pixel interleave
    (a row gather with MindSpore's matmul, the C++ kernels with ``matmul_impl="kernel"``).

    Same parameters as ``nn.Conv2dTranspose(C, O, 2, stride=2, has_bias=True)``:
    ``weight`` float32 (C, O, 2, 2), ``bias`` float32 (O,).
    Input float32 (N, C, H, W) -> output float32 (N, O, 2H, 2W) with
    ``y[n, o, 2i+a, 2j+b] = sum_c x[n, c, i, j] * weight[c, o, a, b] + bias[o]``, then
    ``activation`` ("none" or "relu", see `add_bias`).
    """

    KERNEL = 2

    def __init__(self, in_channels: int, out_channels: int, *, matmul_impl: str = "mindspore",
                 activation: str = "none"):
        super().__init__()
        _check_activation(activation)
        self.activation = activation
        self.in_channels = in_channels
        self.out_channels = out_channels
        k = self.KERNEL
        # nn.Conv2dTranspose computes fan-in from its (C, O, k, k) weight shape as O*k*k.
        _init_weight_and_bias(self, (in_channels, out_channels, k, k), out_channels * k * k,
                              True, out_channels)
        self.use_kernel = matmul_impl == "kernel"
        if self.use_kernel:
            load_kernel()
            _interleave_op()
            _bias_op(activation)
        else:
            self.function = _Deconv2x2Function(k)

    def construct(self, x: Tensor) -> Tensor:
        y = _kernel_deconv2x2(x, self.weight) if self.use_kernel else self.function(x, self.weight)
        return add_bias(y, self.bias, self.activation, use_kernel=self.use_kernel)


class WinogradConv2d(UnfoldConv2d):
    """3x3 convolution, stride 1, padding 1, groups 1, by Winograd F(4x4, 3x3) or F(6x6, 3x3),
    whichever costs less for the input's shape (see winograd.py `choose_layout`).

    Same parameters as `UnfoldConv2d` / ``nn.Conv2d``: ``weight`` float32 (O, C, 3, 3), ``bias``
    float32 (O,) when has_bias. Input float32 (N, C, H, W) -> output float32 (N, O, H, W).

    Winograd pays off only with enough tiles: its weight-domain work (36 or 64 x O x C transformed
    weights and their gradient) does not shrink with the input, and batched products are slow on
    a few columns. Inputs with fewer than ``min_point_channels`` (products per channel
    pair of the whole batch, see `choose_layout`, x input channels; 36 per F4 tile) run on the
    inherited unfold path instead, same parameters.
    Measured per call, fwd+bwd, Winograd vs unfold: (2, 256, 12, 12) 0.074 vs 0.019 s; (2, 256,
    32, 32) 0.036 vs 0.112 s; (2, 64, 48, 48) 0.028 vs 0.019 s; (2, 64, 128, 128) 0.052 vs
    0.163 s.
    """

    KERNEL = (3, 3)
    # Between the measured (2, 64, 48, 48), 663,552 F4 products x channels, where unfold is
    # faster, and (2, 256, 32, 32), 1,179,648, where Winograd is (figures above).
    MIN_POINT_CHANNELS = 1_000_000

    def __init__(self, in_channels: int, out_channels: int, *, has_bias: bool = False,
                 activation: str = "none"):
        super().__init__(in_channels, out_channels, self.KERNEL, padding=1, has_bias=has_bias,
                         matmul_impl="kernel", activation=activation)
        self.winograd = WinogradConvFunction()
        self.min_point_channels = self.MIN_POINT_CHANNELS

    def uses_winograd(self, input_shape: Sequence[int]) -> bool:
        """Whether an input of this (N, C, H, W) shape runs as Winograd (else unfold)."""
        n, c, h, w = input_shape
        return choose_layout(n, h, w).products * c >= self.min_point_channels

    @staticmethod
    def supports(kernel_size: IntOrPair, stride: IntOrPair, padding: IntOrPair,
                 groups: int) -> bool:
        """Whether a convolution with these settings can run as Winograd."""
        return (_pair(kernel_size, "kernel_size") == WinogradConv2d.KERNEL
                and _pair(stride, "stride") == (1, 1) and _pair(padding, "padding") == (1, 1)
                and groups == 1)

    def convolve(self, x: Tensor) -> Tensor:
        if self.uses_winograd(x.shape):
            return self.winograd(x, self.weight)
        return super().convolve(x)

    def extend_repr(self) -> str:
        return f"{super().extend_repr()}, winograd=F(4x4|6x6,3x3)"


def disable_input_grad(conv: nn.Cell) -> nn.Cell:
    """Declare that the input of ``conv`` never needs a gradient (e.g. it is the image).

    The unfold path then skips the input-gradient computation (for the 7x7 stem that is most of
    its backward) and returns zeros for it; weight gradients are unchanged. Native convolutions
    are returned untouched, and a `WinogradConv2d` still computes it on its Winograd path (the
    declaration only allows skipping). Returns ``conv``.
    """
    if isinstance(conv, UnfoldConv2d) and isinstance(conv.function, _UnfoldConvFunction):
        conv.function.input_grad = False
        if conv.patches is not None:
            conv.patches.input_grad = False
    return conv


class NativeConv2dReLU(nn.Conv2d):
    """``nn.Conv2d`` followed by a ReLU, with nn.Conv2d's parameters and names."""

    def construct(self, x: Tensor) -> Tensor:
        return ops.relu(super().construct(x))


class NativeConv2dTransposeReLU(nn.Conv2dTranspose):
    """``nn.Conv2dTranspose`` followed by a ReLU, with its parameters and names."""

    def construct(self, x: Tensor) -> Tensor:
        return ops.relu(super().construct(x))


# --------------------------------------------------------------------------------------------
# Factories (the only way model code builds convolutions)
# --------------------------------------------------------------------------------------------
def build_conv2d(in_channels: int, out_channels: int, kernel_size: IntOrPair, *,
                 stride: IntOrPair = 1, padding: IntOrPair = 0, groups: int = 1,
                 has_bias: bool = False, impl: str = "native",
                 activation: str = "none") -> nn.Cell:
    """2-D convolution on NCHW float32 tensors, optionally followed by a ReLU.

    Args:
        in_channels, out_channels: channel counts C and O.
        kernel_size, stride, padding: int or (h, w) pair; zero padding on both sides.
        groups: grouped convolution (C and O divisible by it).
        has_bias: add a learned (O,) bias.
        activation: "none" or "relu" after the bias (one fused operator with the bias on the
            C++ kernels, impl "winograd").
        impl: "native" -> ``nn.Conv2d``; "unfold" -> `UnfoldConv2d` (same parameters, fast CPU);
            "winograd" -> `WinogradConv2d` for 3x3 / stride 1 / padding 1 / groups 1 (fastest on
            CPU, builds the C++ kernels on first use), `UnfoldConv2d` on the C++ matmul kernel
            for every other shape.

    Returns:
        Cell mapping (N, C, H, W) -> (N, O, Ho, Wo) with parameters ``weight`` (O, C/groups,
        kh, kw) and ``bias`` (O,) when has_bias.
    """
    _check_impl(impl)
    _check_activation(activation)
    if impl == "native":
        pad = _pair(padding, "padding")
        native = NativeConv2dReLU if activation == "relu" else nn.Conv2d
        return native(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                      padding=(pad[0], pad[0], pad[1], pad[1]), group=groups, has_bias=has_bias)
    if impl == "winograd" and WinogradConv2d.supports(kernel_size, stride, padding, groups):
        return WinogradConv2d(in_channels, out_channels, has_bias=has_bias, activation=activation)
    return UnfoldConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                        groups=groups, has_bias=has_bias,
                        matmul_impl="kernel" if impl == "winograd" else "mindspore",
                        activation=activation)


def build_deconv2x2(in_channels: int, out_channels: int, *, impl: str = "native",
                    activation: str = "none") -> nn.Cell:
    """Transposed convolution with kernel 2, stride 2 and bias (NCHW, doubles H and W),
    optionally followed by a ReLU (``activation``, as in `build_conv2d`).

    Returns a Cell (N, C, H, W) -> (N, O, 2H, 2W) with parameters ``weight`` (C, O, 2, 2) and
    ``bias`` (O,) for every impl ("native" -> ``nn.Conv2dTranspose``, "unfold" -> MindSpore
    matmul + row gather, "winograd" -> the C++ matmul and sub-pixel interleave kernels).
    """
    _check_impl(impl)
    _check_activation(activation)
    if impl == "native":
        native = NativeConv2dTransposeReLU if activation == "relu" else nn.Conv2dTranspose
        return native(in_channels, out_channels, UnfoldDeconv2x2.KERNEL,
                      stride=UnfoldDeconv2x2.KERNEL, has_bias=True)
    return UnfoldDeconv2x2(in_channels, out_channels,
                           matmul_impl="kernel" if impl == "winograd" else "mindspore",
                           activation=activation)

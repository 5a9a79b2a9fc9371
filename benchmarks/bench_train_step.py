"""Benchmark: R50-FPN Mask R-CNN train step on CPU, native vs unfold vs winograd convolutions.

    .venv/bin/python benchmarks/bench_train_step.py [--size 512] [--batch 2] [--steps 3]
        [--warmup-steps 4] [--native-step estimate|measure|skip] [--threads N] [--lr 0]
        [--override backbone.norm=frozen_bn ...]

One run builds the detector from ``conf/`` (``detector=mask_rcnn``, ``backbone=resnet50``, COCO's
80 classes) once per convolution implementation (``winograd``: Winograd F(4x4, 3x3) or F(6x6,
3x3), by shape, for the 3x3 stride-1 convolutions, unfold on the C++ matmul kernel for the
rest; ``winograd_bf16``: the same with
``hardware.matmul_precision=bfloat16``, the kernel's products on bfloat16-rounded operands;
``unfold``: im2col + MindSpore matmul everywhere; ``native``: MindSpore's kernels), on a synthetic batch that follows the batch contract (``--batch`` images of
``--size``², ``--objects`` instances each), and reports:

1. **Train step** (``step_s_<impl>``, winograd, winograd_bf16 and unfold): wall time of one full training step
   (forward, backward, loss scaling, momentum-SGD update; ``instaboost.engine.train_step.make_train_step`` in
   PyNative mode): ``--warmup-steps`` untimed steps, then the median of ``--steps`` timed
   steps. The warm-up is what a long run has behind it: MindSpore's memory pool grows over the
   first steps, and a step that grows it pays for fresh pages (page faults; measured at lr 0:
   580k / 49k / 0 / 10k / 0 minor faults in steps 0-4, the second step 0.4-0.8 s slower than
   the settled ones). The minor faults of each timed step are printed and in the JSON
   (``minor_faults_timed_<impl>``): thousands mean the pool had not settled. The model is
   built as the train task builds it in PyNative mode: the mask head runs on the sampled
   positives (``mask_head_rois`` in the JSON) and the assigners on the occupied GT slots;
   ``--fixed-slots`` runs both on every slot instead (graph mode's fixed shapes). By default
   the update runs at learning rate 0 (``--lr``): the model stays frozen, so every step has the
   same proposals, hence the same positives and mask-head RoIs, and MindSpore's seed (``SEED``,
   set before each variant) draws the same samples in every run: a fixed workload at which to
   compare two commits in alternating runs, or the variants of one run. With ``--lr 0.02``
   (the schedules' base rate) the steps train, and the positives -- the mask head's workload,
   about 8 ms per RoI fwd+bwd at 512² -- grow from step to step as the RPN learns. Either way
   the RoIs of each timed step are printed and in the JSON (``mask_head_rois_timed_<impl>``);
   compare steps at equal RoIs.
   MindSpore's native CPU convolutions run at about 1-2 GFLOP/s, so a native step at 512² takes
   minutes (0.74 TFLOP of convolutions forward and backward at 48 mask RoIs per image; 1.4 at
   the fixed 128). By default (``--native-step estimate``) it is therefore
   *estimated* as ``step_s_unfold - conv_s_unfold + conv_s_native`` (the non-convolution work is
   identical in both paths) and the JSON says ``"step_s_native_estimated": true``;
   ``--native-step measure`` times real native steps instead (use it at small ``--size``);
   ``--native-step skip`` leaves the native path out entirely (its JSON figures are null).
2. **Convolution throughput** (``conv_gflops_<impl>``, fwd+bwd; ``conv_gflops_fwd_<impl>``,
   forward only). Definition: every convolution call of one ``forward_train`` is recorded with
   its real input shape (backbone, FPN, RPN head on each level, mask head incl. the 2x2
   deconvolution; the mask logits of each RoI's class are a gather and a product in training,
   not a convolution, and are not counted). Forward FLOPs of a call are
   ``2 * N * Ho * Wo * O * (C / groups) * kh * kw`` (deconvolution: ``2 * N * H * W * C * O * 4``);
   one fwd+bwd counts 3x the forward FLOPs (dX and dW each cost one forward). Each distinct
   (layer configuration, input shape) is timed alone -- forward, then forward+backward with
   gradients w.r.t. input and weights (``ms.grad`` of the cell, all-ones output sensitivity),
   best of ``--layer-repeats`` after a warm-up -- and the
   times are summed with each call's multiplicity. A cell is timed with what it applies after
   the convolution, on every path: its bias, and the ReLU of the cells built with one (the
   RPN's 3x3 convolution, the mask head's convolutions and deconvolution). GFLOP/s = FLOPs / summed time; for winograd
   this is an *effective* rate (direct-convolution FLOPs per second: Winograd does fewer).
   Native layers above ``--native-cap-gflop`` forward GFLOP are timed on a reduced shape (fewer
   images, then halved height and width) and scaled by the FLOP ratio (convolution time is
   linear in N*Ho*Wo); the per-layer table marks them with ``*``.

The machine load average is printed with the figures, and ``cores_used_winograd_step`` (process
CPU seconds / wall seconds of the timed winograd steps; MindSpore's thread pool also spends CPU
time spin-waiting, so it is an upper bound of the useful share) hints at how much of the shared
machine the run got. The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import instaboost  # noqa: E402,F401  (before mindspore: sets the OpenMP wait policy)
import mindspore as ms  # noqa: E402
from mindspore import Tensor, nn  # noqa: E402

from instaboost.models.layers.gemm import set_matmul_precision  # noqa: E402

COCO_NUM_CLASSES = 80
DEFAULT_SIZE = 512
DEFAULT_BATCH = 2
DEFAULT_STEPS = 3
DEFAULT_WARMUP_STEPS = 4
DEFAULT_OBJECTS = 8
DEFAULT_LAYER_REPEATS = 2
DEFAULT_NATIVE_CAP_GFLOP = 0.5
GIGA = 1e9
FWD_BWD_FLOP_FACTOR = 3
DECONV_TAPS = 4
# Batch-contract image metadata columns: [image_id, orig_h, orig_w, resized_h, resized_w].
IMG_META_COLUMNS = 5
MIN_OBJECT_FRACTION = 0.1
MAX_OBJECT_FRACTION = 0.5
# 0: the model stays frozen and every step has the same workload (see the module docstring).
DEFAULT_LR = 0.0
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
TOP_LAYERS = 15
SEED = 0
# Measured variants: label -> (hardware.conv_impl, hardware.matmul_precision).
VARIANTS = OrderedDict([("winograd", ("winograd", "float32")),
                        ("winograd_bf16", ("winograd", "bfloat16")),
                        ("unfold", ("unfold", "float32"))])


def compose_sections(overrides: Sequence[str]):
    """(detector, backbone, num_gts, gt_mask_size) from conf/config.yaml with ``overrides``."""
    from hydra import compose, initialize_config_dir

    import instaboost.config  # registers resolvers and schemas  # noqa: F401
    from instaboost.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    detector = cfg.detector
    return detector, cfg.backbone, int(detector.num_gts), int(detector.gt_mask_size)


def synthetic_batch(batch: int, size: int, num_gts: int, mask_size: int, objects: int,
                    rng: np.random.Generator) -> Tuple[Tensor, ...]:
    """A batch-contract batch: random image, ``objects`` elliptic instances per image."""
    image = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    img_meta = np.zeros((batch, IMG_META_COLUMNS), np.float32)
    img_meta[:, 0] = np.arange(batch)
    img_meta[:, 1:] = size
    boxes = np.zeros((batch, num_gts, 4), np.float32)
    labels = np.zeros((batch, num_gts), np.int32)
    masks = np.zeros((batch, num_gts, mask_size, mask_size), np.uint8)
    valid = np.zeros((batch, num_gts), np.bool_)
    yy, xx = np.mgrid[:mask_size, :mask_size]
    centre = (mask_size - 1) / 2.0
    ellipse = ((yy - centre) ** 2 + (xx - centre) ** 2) <= centre ** 2
    for b in range(batch):
        for g in range(min(objects, num_gts)):
            w, h = rng.uniform(MIN_OBJECT_FRACTION, MAX_OBJECT_FRACTION, size=2) * size
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            boxes[b, g] = (x0, y0, x0 + w, y0 + h)
            labels[b, g] = rng.integers(1, COCO_NUM_CLASSES + 1)
            masks[b, g] = ellipse
            valid[b, g] = True
    crowd = np.zeros((batch, num_gts), np.bool_)
    return tuple(Tensor(a) for a in (image, img_meta, boxes, labels, masks, valid, crowd))


def build(impl: str, detector_cfg, backbone_cfg, trim_empty_slots: bool, lr: float = DEFAULT_LR):
    """(detector, train step) for one convolution implementation, SGD at learning rate ``lr``."""
    from instaboost.builders import build_detector, layer_impl_for, uses_cpu_kernels
    from instaboost.engine.finite import build_finite_check
    from instaboost.engine.optimizer import build_sgd
    from instaboost.engine.train_step import build_loss_scaler, make_train_step

    detector = build_detector(detector_cfg, backbone_cfg, num_classes=COCO_NUM_CLASSES,
                              conv_impl=impl, seed=SEED, trim_empty_slots=trim_empty_slots)
    detector.set_train(True)
    optimizer = build_sgd(detector.trainable_params(), learning_rate=lr, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY, impl=layer_impl_for(impl))
    step = make_train_step(detector.forward_train, optimizer, loss_names=detector.loss_names,
                           scaler=build_loss_scaler("none", 1.0),
                           finite_check=build_finite_check(uses_cpu_kernels(impl)))
    return detector, step


def count_mask_head_rois(detector: nn.Cell) -> List[int]:
    """A list that receives the mask head's RoI count at every call of ``detector`` from now on
    (the step's workload: the sampled positives grow as the model learns)."""
    counts: List[int] = []

    def record(cell, inputs):
        counts.append(int(inputs[0].shape[0]))

    detector.roi_heads.mask_head.register_forward_pre_hook(record)
    return counts


class StepTimes(NamedTuple):
    warmup_s: List[float]
    timed_s: List[float]
    minor_faults: List[int]     # of each timed step: fresh pages the memory pool touched
    cpu_s: float                # process CPU seconds per timed step


def time_steps(step, batch: Sequence[Tensor], steps: int, warmup_steps: int) -> StepTimes:
    """Run ``warmup_steps`` untimed steps, then time ``steps`` steps one by one."""
    def run() -> Tuple[float, int]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        loss, _, finite = step(*batch)
        loss.asnumpy()
        if not bool(finite.asnumpy()):
            raise RuntimeError("benchmark step produced non-finite gradients")
        return (time.perf_counter() - start,
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    warmup = [run()[0] for _ in range(warmup_steps)]
    cpu_start = time.process_time()
    timed = [run() for _ in range(steps)]
    return StepTimes(warmup, [t for t, _ in timed], [f for _, f in timed],
                     (time.process_time() - cpu_start) / steps)


# --------------------------------------------------------------------------------------------
# Convolution layers
# --------------------------------------------------------------------------------------------
class ConvCall(NamedTuple):
    name: str            # cell name inside the detector
    input_shape: Tuple[int, int, int, int]


def _is_conv(cell: nn.Cell) -> bool:
    from instaboost.models.layers.conv import UnfoldConv2d, UnfoldDeconv2x2

    # WinogradConv2d is an UnfoldConv2d.
    return isinstance(cell, (UnfoldConv2d, UnfoldDeconv2x2, nn.Conv2d, nn.Conv2dTranspose))


def record_conv_calls(detector: nn.Cell, batch: Sequence[Tensor]) -> List[ConvCall]:
    """Every convolution call of one forward_train, with its input shape."""
    calls: List[ConvCall] = []
    handles = []
    for name, cell in detector.cells_and_names():
        if _is_conv(cell):
            def hook(_cell, inputs, cell_name=name):
                calls.append(ConvCall(cell_name, tuple(inputs[0].shape)))
            handles.append(cell.register_forward_pre_hook(hook))
    detector.forward_train(*batch)
    for handle in handles:
        handle.remove()
    return calls


def conv_signature(cell: nn.Cell) -> Tuple:
    """Configuration of a convolution cell that determines its cost (impl-independent)."""
    from instaboost.models.layers.conv import UnfoldConv2d, UnfoldDeconv2x2

    if isinstance(cell, (UnfoldDeconv2x2, nn.Conv2dTranspose)):
        cin, cout = cell.weight.shape[0], cell.weight.shape[1]
        return ("deconv2x2", cin, cout)
    if isinstance(cell, UnfoldConv2d):
        return ("conv", cell.in_channels, cell.out_channels, cell.kernel_size, cell.stride,
                cell.padding, cell.groups, cell.has_bias)
    pad = cell.padding if isinstance(cell.padding, int) else tuple(cell.padding)[::2]
    return ("conv", cell.in_channels, cell.out_channels, tuple(cell.kernel_size),
            tuple(cell.stride), (pad, pad) if isinstance(pad, int) else tuple(pad), cell.group,
            cell.has_bias)


def forward_flops(signature: Tuple, input_shape: Tuple[int, int, int, int]) -> float:
    """Forward FLOPs (2 per multiply-add) of one call."""
    n, _, h, w = input_shape
    if signature[0] == "deconv2x2":
        _, cin, cout = signature
        return 2.0 * n * h * w * cin * cout * DECONV_TAPS
    _, cin, cout, (kh, kw), (sh, sw), (ph, pw), groups, _ = signature
    out_h = (h + 2 * ph - kh) // sh + 1
    out_w = (w + 2 * pw - kw) // sw + 1
    return 2.0 * n * out_h * out_w * cout * (cin // groups) * kh * kw


def _reduced_shape(signature, shape, cap_flops: float):
    """Shrink N, then H and W, until one forward is below cap_flops."""
    n, c, h, w = shape
    kernel = 1 if signature[0] == "deconv2x2" else max(signature[3])
    while forward_flops(signature, (n, c, h, w)) > cap_flops and n > 1:
        n = max(1, n // 2)
    while forward_flops(signature, (n, c, h, w)) > cap_flops and min(h, w) // 2 >= max(kernel, 2):
        h, w = h // 2, w // 2
    return (n, c, h, w)


def time_layer(cell: nn.Cell, shape, repeats: int, rng: np.random.Generator):
    """(best forward seconds, best fwd+bwd seconds) of ``cell`` on a random input of ``shape``."""
    x = Tensor(rng.standard_normal(shape).astype(np.float32))
    # Gradient of the non-scalar output with an all-ones sensitivity: no extra loss op is timed.
    grad_fn = ms.grad(cell, grad_position=0, weights=cell.trainable_params())

    def forward():
        cell(x).asnumpy()

    def forward_backward():
        dx, _ = grad_fn(x)
        dx.asnumpy()

    results = []
    for fn in (forward, forward_backward):
        fn()  # warm-up (index caches, kernel selection)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        results.append(best)
    return tuple(results)


class LayerTiming(NamedTuple):
    signature: Tuple
    input_shape: Tuple[int, int, int, int]
    calls: int
    flops: float            # forward FLOPs of all calls
    fwd_s: float            # all calls
    fwd_bwd_s: float        # all calls
    extrapolated: bool


def time_convolutions(detector: nn.Cell, calls: Sequence[ConvCall], *, repeats: int,
                      cap_flops: float, rng: np.random.Generator) -> List[LayerTiming]:
    """Time each distinct (configuration, input shape) once, weighted by its call count."""
    cells = dict(detector.cells_and_names())
    groups: "OrderedDict[Tuple, List[ConvCall]]" = OrderedDict()
    for call in calls:
        key = (conv_signature(cells[call.name]), call.input_shape)
        groups.setdefault(key, []).append(call)
    timings = []
    for (signature, shape), members in groups.items():
        cell = cells[members[0].name]
        run_shape = _reduced_shape(signature, shape, cap_flops) if cap_flops else shape
        fwd, fwd_bwd = time_layer(cell, run_shape, repeats, rng)
        scale = forward_flops(signature, shape) / forward_flops(signature, run_shape)
        count = len(members)
        timings.append(LayerTiming(signature, shape, count,
                                   count * forward_flops(signature, shape), count * fwd * scale,
                                   count * fwd_bwd * scale, run_shape != shape))
    return timings


def summarize(timings: Sequence[LayerTiming]) -> Dict[str, float]:
    flops = sum(t.flops for t in timings)
    fwd = sum(t.fwd_s for t in timings)
    fwd_bwd = sum(t.fwd_bwd_s for t in timings)
    return {"gflop_fwd": flops / GIGA, "fwd_s": fwd, "fwd_bwd_s": fwd_bwd,
            "gflops_fwd": flops / fwd / GIGA,
            "gflops_fwd_bwd": FWD_BWD_FLOP_FACTOR * flops / fwd_bwd / GIGA}


def print_layer_table(impl: str, timings: Sequence[LayerTiming]) -> None:
    print(f"\n[{impl}] convolution calls, slowest first (fwd+bwd of all calls; * = extrapolated)")
    print(f"{'layer':<44} {'input':<20} {'calls':>5} {'GFLOP':>8} {'fwd s':>8} {'f+b s':>8} "
          f"{'GF/s':>7}")
    for t in sorted(timings, key=lambda t: -t.fwd_bwd_s)[:TOP_LAYERS]:
        sig = t.signature
        label = (f"deconv2x2 {sig[1]}->{sig[2]}" if sig[0] == "deconv2x2" else
                 f"conv{sig[3][0]}x{sig[3][1]} s{sig[4][0]} g{sig[6]} {sig[1]}->{sig[2]}")
        gflops = FWD_BWD_FLOP_FACTOR * t.flops / t.fwd_bwd_s / GIGA
        mark = "*" if t.extrapolated else ""
        print(f"{label:<44} {str(t.input_shape):<20} {t.calls:>5} {t.flops / GIGA:>8.2f} "
              f"{t.fwd_s:>8.3f} {t.fwd_bwd_s:>8.3f} {gflops:>7.1f}{mark}")


def main(argv: Sequence[str] | None = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS,
                        help="untimed steps first, while MindSpore's memory pool grows")
    parser.add_argument("--objects", type=int, default=DEFAULT_OBJECTS)
    parser.add_argument("--layer-repeats", type=int, default=DEFAULT_LAYER_REPEATS)
    parser.add_argument("--native-cap-gflop", type=float, default=DEFAULT_NATIVE_CAP_GFLOP,
                        help="native layers above this forward GFLOP run on a reduced shape")
    parser.add_argument("--native-step", choices=("estimate", "measure", "skip"),
                        default="estimate")
    parser.add_argument("--fixed-slots", action="store_true",
                        help="run the mask head on all sampled-positive slots and the assigners "
                             "on all num_gts GT slots (graph mode's fixed shapes) instead of the "
                             "occupied ones, as the PyNative train task does")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help="SGD learning rate of the steps; 0 (default) keeps every step's "
                             "workload (mask-head RoIs) the same; 0.02 lets the model learn")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="MindSpore CPU kernel threads (0: MindSpore's default)")
    parser.add_argument("--override", action="append", default=[],
                        help="Hydra override for conf/config.yaml, e.g. backbone.norm=frozen_bn")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0:
        parser.error(f"--steps must be >= 1 and --warmup-steps >= 0, got {args.steps} and "
                     f"{args.warmup_steps}")

    if args.threads:
        ms.device_context.cpu.op_tuning.threads_num(args.threads)
    # As the train task does on CPU: blocking dispatch halved a 256 px step (measured there).
    ms.runtime.launch_blocking()
    rng = np.random.default_rng(SEED)
    detector_cfg, backbone_cfg, num_gts, mask_size = compose_sections(args.override)
    batch = synthetic_batch(args.batch, args.size, num_gts, mask_size, args.objects, rng)
    print(f"Mask R-CNN R50-FPN train step, batch {args.batch} x {args.size}x{args.size}, "
          f"{os.cpu_count()} CPUs, MindSpore {ms.__version__}, threads {args.threads or 'default'},"
          f" load average {os.getloadavg()}", flush=True)

    result: Dict[str, float] = {"size": args.size, "batch": args.batch}
    conv: Dict[str, Dict[str, float]] = {}
    steps: Dict[str, float] = {}
    step_cpu: Dict[str, float] = {}
    step_rois: Dict[str, List[int]] = {}
    step_faults: Dict[str, List[int]] = {}
    calls: List[ConvCall] = []
    fast_impls = tuple(VARIANTS)
    impls = fast_impls if args.native_step == "skip" else fast_impls + ("native",)
    for impl in impls:
        conv_impl, precision = VARIANTS.get(impl, (impl, "float32"))
        set_matmul_precision(precision)
        ms.set_seed(SEED)  # the samplers' draws: the same in every run and for every variant
        detector, step = build(conv_impl, detector_cfg, backbone_cfg, not args.fixed_slots,
                               args.lr)
        if not calls:
            # Recorded on a fast model (a native forward alone takes minutes); every model has
            # the same cells under the same names.
            calls = record_conv_calls(detector, batch)
        cap = 0.0 if impl != "native" else args.native_cap_gflop * GIGA
        timings = time_convolutions(detector, calls, repeats=args.layer_repeats, cap_flops=cap,
                                    rng=rng)
        conv[impl] = summarize(timings)
        print_layer_table(impl, timings)
        print(f"[{impl}] {len(calls)} convolution calls, {conv[impl]['gflop_fwd']:.1f} GFLOP "
              f"forward; conv time fwd {conv[impl]['fwd_s']:.2f} s, fwd+bwd "
              f"{conv[impl]['fwd_bwd_s']:.2f} s -> {conv[impl]['gflops_fwd']:.1f} / "
              f"{conv[impl]['gflops_fwd_bwd']:.1f} GFLOP/s", flush=True)
        if impl in fast_impls or args.native_step == "measure":
            rois = count_mask_head_rois(detector)
            times = time_steps(step, batch, args.steps, args.warmup_steps)
            steps[impl] = float(np.median(times.timed_s))
            step_cpu[impl] = times.cpu_s
            step_faults[impl] = times.minor_faults
            step_rois[impl] = rois[args.warmup_steps:]     # the timed steps
            print(f"[{impl}] train step: warm-up {', '.join(f'{t:.2f}' for t in times.warmup_s)}"
                  f" s, timed {', '.join(f'{t:.2f}' for t in times.timed_s)} s -> median "
                  f"{steps[impl]:.2f} s (mask head RoIs {step_rois[impl]}, minor page faults "
                  f"{times.minor_faults}), {times.cpu_s:.1f} CPU-s per step "
                  f"(load average {os.getloadavg()})", flush=True)
        del detector, step
    set_matmul_precision("float32")
    estimated = "native" in conv and "native" not in steps
    if estimated:
        steps["native"] = steps["unfold"] - conv["unfold"]["fwd_bwd_s"] + conv["native"]["fwd_bwd_s"]

    def native(value):
        return None if "native" not in conv else round(value(), 3)

    mask_rois = next((c.input_shape[0] for c in calls if "mask_head" in c.name), 0)
    result.update({
        "fixed_slots": args.fixed_slots,
        "lr": args.lr,
        "mask_head_rois": mask_rois,
        # per timed step: the workload grows as the model learns (lr > 0)
        "mask_head_rois_timed_winograd": step_rois["winograd"],
        "mask_head_rois_timed_winograd_bf16": step_rois["winograd_bf16"],
        "warmup_steps": args.warmup_steps,
        "minor_faults_timed_winograd": step_faults["winograd"],
        "minor_faults_timed_winograd_bf16": step_faults["winograd_bf16"],
        "step_s_native": native(lambda: steps["native"]),
        "step_s_native_estimated": estimated,
        "step_s_unfold": round(steps["unfold"], 3),
        "step_s_winograd": round(steps["winograd"], 3),
        "step_s_winograd_bf16": round(steps["winograd_bf16"], 3),
        "speedup": native(lambda: steps["native"] / steps["winograd"]),
        "speedup_unfold": native(lambda: steps["native"] / steps["unfold"]),
        "speedup_winograd_vs_unfold": round(steps["unfold"] / steps["winograd"], 3),
        "speedup_bf16_vs_float32": round(steps["winograd"] / steps["winograd_bf16"], 3),
        "conv_gflops_native": native(lambda: conv["native"]["gflops_fwd_bwd"]),
        "conv_gflops_unfold": round(conv["unfold"]["gflops_fwd_bwd"], 2),
        # direct-convolution FLOPs per second (Winograd itself does fewer multiplies)
        "conv_gflops_winograd_effective": round(conv["winograd"]["gflops_fwd_bwd"], 2),
        "conv_gflops_winograd_bf16_effective": round(conv["winograd_bf16"]["gflops_fwd_bwd"], 2),
        "conv_gflops_fwd_native": native(lambda: conv["native"]["gflops_fwd"]),
        "conv_gflops_fwd_unfold": round(conv["unfold"]["gflops_fwd"], 2),
        "conv_gflops_fwd_winograd_effective": round(conv["winograd"]["gflops_fwd"], 2),
        "conv_gflop_fwd_per_step": round(conv["unfold"]["gflop_fwd"], 1),
        "conv_s_native": native(lambda: conv["native"]["fwd_bwd_s"]),
        "conv_s_unfold": round(conv["unfold"]["fwd_bwd_s"], 3),
        "conv_s_winograd": round(conv["winograd"]["fwd_bwd_s"], 3),
        "conv_s_winograd_bf16": round(conv["winograd_bf16"]["fwd_bwd_s"], 3),
        "conv_share_of_winograd_step": round(conv["winograd"]["fwd_bwd_s"] / steps["winograd"], 3),
        # process CPU seconds / wall seconds of the steps (includes thread-pool spinning)
        "cores_used_winograd_step": round(step_cpu["winograd"] / steps["winograd"], 2),
        "threads": args.threads,
        "loadavg_1min": os.getloadavg()[0],
    })
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

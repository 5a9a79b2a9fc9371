"""Benchmark: the per-operator cost of a train step's dispatch, PyNative vs a compiled graph.

    .venv/bin/python benchmarks/bench_dispatch.py [--layers 100] [--size 4] [--rounds 5]
        [--repeats 5] [--threads N]

Why: a float32 CPU train step at 512² (``bench_train_step.py``) makes about 2,600 operator
calls, and MindSpore's profiler puts 0.6-0.8 s of its 4.1-4.5 s between them. The step runs in
PyNative mode because the detector does not compile under ``ms.jit`` (README, Known limits).
This measures what compiling would buy per call, on the pattern of the project's unfold and
Winograd convolutions: a cell whose ``construct`` calls a C++ AOT operator (here the matmul
kernel of ``instaboost.models.layers.gemm``) and whose ``bprop`` calls it twice (the two
gradients).

A chain of ``--layers`` such cells on tiny operands (``--size``², so that the kernels' own work
is negligible) is differentiated with ``ms.grad`` for both its inputs, x and the weight, so that
every product is needed: with the gradient of x alone, a compiled graph drops each layer's
weight-gradient product and the forward products that only feed it, two thirds of the calls
counted. It runs once in PyNative mode and once compiled with ``ms.jit``, with synchronous
launches and the CPU threads of ``bench_train_step.py``. The two
are timed in alternating rounds (``--rounds``, each the mean of ``--repeats`` calls after one
untimed call); the figures are the medians over the rounds, per operator call (three per
layer: one forward, two backward).

Output: one line per round, then one JSON line (last): ``us_per_op_pynative``,
``us_per_op_jit``, their ratio ``pynative_over_jit``, and the settings.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import instaboost  # noqa: F401,E402  (sets the OpenMP policy before MindSpore loads OpenMP)
import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import Tensor, nn  # noqa: E402

from instaboost.models.layers.gemm import kernel_op, load_kernel  # noqa: E402

OPS_PER_LAYER = 3  # one forward product, two backward products


class KernelProductLayer(nn.Cell):
    """y = x · w on the C++ kernel, with a bprop cell as the unfold and Winograd convolutions
    have (the bprop repeats the two products of the operator's own backward, `gemm.kernel_op`,
    on purpose: the cell is the pattern measured).

    ``KernelDense`` (``layers/linear.py``) is the same product, but it reaches the kernel through
    ``gemm.matmul``, whose cached op lookup the graph compiler cannot parse ("func graph is
    empty" at ``matmul``), so it cannot be timed compiled; this cell holds its three operators
    instead, as a graph-compilable convolution would.
    """

    def __init__(self):
        super().__init__()
        self.product = kernel_op(False, False)
        self.product_nt = kernel_op(False, True)
        self.product_tn = kernel_op(True, False)

    def construct(self, x: Tensor, w: Tensor) -> Tensor:
        return self.product(x, w)

    def bprop(self, x: Tensor, w: Tensor, out: Tensor, dout: Tensor):
        return self.product_nt(dout, w), self.product_tn(x, dout)   # dx = dy·wᵀ, dw = xᵀ·dy


class KernelProductChain(nn.Cell):
    """``layers`` KernelProductLayer cells in a row, summed to a scalar loss."""

    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.CellList([KernelProductLayer() for _ in range(layers)])

    def construct(self, x: Tensor, w: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, w)
        return x.sum()


def time_call(function: Callable, args, repeats: int) -> float:
    """Mean seconds per call over ``repeats`` calls, after one untimed call."""
    function(*args).asnumpy()
    start = time.perf_counter()
    for _ in range(repeats):
        result = function(*args)
    result.asnumpy()
    return (time.perf_counter() - start) / repeats


def main(argv: List[str] | None = None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--size", type=int, default=4, help="side of the square operands")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="MindSpore CPU kernel threads (as bench_train_step.py)")
    args = parser.parse_args(argv)
    for name in ("layers", "size", "rounds", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    ms.runtime.launch_blocking()
    load_kernel()
    rng = np.random.default_rng(0)
    operands = tuple(Tensor(rng.uniform(-0.1, 0.1, (args.size, args.size)).astype(np.float32))
                     for _ in range(2))
    chain = KernelProductChain(args.layers)
    gradients = ms.grad(chain, grad_position=(0, 1))

    def both_gradients(x: Tensor, w: Tensor) -> Tensor:
        dx, dw = gradients(x, w)
        return dx.sum() + dw.sum()   # both used: no product of the chain is dead code

    variants = {"pynative": both_gradients, "jit": ms.jit(both_gradients)}
    # Same gradients both ways, or the comparison would be between different computations.
    np.testing.assert_allclose(variants["jit"](*operands).asnumpy(),
                               variants["pynative"](*operands).asnumpy(), rtol=1e-5, atol=1e-7)

    calls = args.layers * OPS_PER_LAYER
    per_op: Dict[str, List[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, function in variants.items():
            per_op[name].append(time_call(function, operands, args.repeats) / calls * 1e6)
        print(f"round {round_index}: " + ", ".join(
            f"{name} {values[-1]:.1f} us/op" for name, values in per_op.items()), flush=True)

    pynative = statistics.median(per_op["pynative"])
    jit = statistics.median(per_op["jit"])
    result = {"layers": args.layers, "ops_per_layer": OPS_PER_LAYER, "size": args.size,
              "rounds": args.rounds, "repeats": args.repeats, "threads": args.threads,
              "us_per_op_pynative": round(pynative, 1), "us_per_op_jit": round(jit, 1),
              "pynative_over_jit": round(pynative / jit, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

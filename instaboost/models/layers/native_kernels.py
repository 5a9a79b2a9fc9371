"""Build and locate the project's C++ CPU kernels (``kernels/cpu/*.cc``) for MindSpore AOT ops.

A kernel library is compiled on first use with the system C++ compiler into ``kernels/build/``
(ignored by git) and reused while its source (with the shared headers ``kernels/cpu/*.h``), the
compiler (its real path and ``--version``), the flags and the CPU stay the same: the file name
carries a hash of them all, because
``-march=native`` code built on one CPU may not run on another. The build writes to a temporary
file and renames it, so concurrent first uses (a multirun, parallel tests) never load a
half-written library. Beside each library the build records its SHA-256
(``<library>.sha256``); a library that no longer matches it (truncated by a full disk or an
interrupted copy, overwritten) is rebuilt rather than loaded: the dynamic loader maps a truncated
library and the process dies of SIGBUS at its first call, with no message.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Callable, Optional, Tuple

from mindspore import ops

# The hardware.conv_impl that brings the C++ kernels: with it the other layers that have a
# kernel implementation (norms, the stem's pooling, RoIAlign, the box head's FCs, the gradient
# check) use theirs too.
CONV_IMPL_WITH_CPU_KERNELS = "winograd"
KERNELS_DIR = Path(__file__).resolve().parents[3] / "kernels"
BUILD_DIR = KERNELS_DIR / "build"
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-Wall")
COMPILER_QUERY_TIMEOUT_S = 30  # `g++ --version`, once per compiler and process
# Extra flags of the kernels whose float32 results must equal those of MindSpore's operators
# bit for bit (NMS, the max-IoU assignment): no product fused with a sum into an FMA.
SEPARATE_ROUNDING_FLAGS = ("-ffp-contract=off",)

log = logging.getLogger(__name__)


def uses_cpu_kernels(conv_impl: str) -> bool:
    """Whether a run with this hardware.conv_impl uses the C++ CPU kernels of ``kernels/``."""
    return conv_impl == CONV_IMPL_WITH_CPU_KERNELS


def layer_impl_for(conv_impl: str) -> str:
    """The ``impl`` of a layer with a kernel implementation: "kernel" or "mindspore"."""
    return "kernel" if uses_cpu_kernels(conv_impl) else "mindspore"


class KernelBuildError(RuntimeError):
    """A C++ kernel library could not be built (missing compiler or source, compile error)."""


def _cpu_signature() -> str:
    """CPU model and feature flags (what -march=native compiles for), or the machine name.
    x86 names them "model name" and "flags"; Arm "CPU implementer", "CPU part" and "Features"."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    wanted = [line for line in lines
              if line.startswith(("model name", "flags", "CPU implementer", "CPU architecture",
                                  "CPU variant", "CPU part", "Features"))]
    return "\n".join(sorted(set(wanted))) or platform.machine()


@functools.lru_cache(maxsize=None)
def _compiler_identity(compiler: str) -> str:
    """The compiler's real path and what it says it is: an upgraded g++ at the same path, or
    another version behind the same name, must not reuse a library the old one built."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 check=False, timeout=COMPILER_QUERY_TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError) as error:
        version = f"version unknown: {error}"
    return f"{os.path.realpath(compiler)}\n{version.strip()}"


def _compiler() -> str:
    requested = os.environ.get("CXX")
    compiler = shutil.which(requested) if requested else (shutil.which("g++")
                                                           or shutil.which("c++"))
    if not compiler:
        raise KernelBuildError(
            f"no C++ compiler found (CXX={requested!r}; install g++ or set CXX): it is needed "
            "to build "
            f"{KERNELS_DIR / 'cpu'} for hardware.conv_impl=winograd; "
            "hardware.conv_impl=unfold needs none")
    return compiler


def checksum_record(library: Path) -> Path:
    """The file in which the build of ``library`` recorded its SHA-256."""
    return library.with_suffix(".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_intact(library: Path) -> bool:
    """Whether ``library`` is still what its build wrote (False without a record)."""
    try:
        return checksum_record(library).read_text().strip() == _sha256(library)
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def kernel_library(name: str, extra_flags: Tuple[str, ...] = ()) -> str:
    """Absolute path of the shared library built from ``kernels/cpu/<name>.cc``.

    ``extra_flags`` are appended to CXX_FLAGS (tests build the portable variants with them,
    e.g. ``("-mno-avx512f",)``); they are part of the library's hash.
    """
    source = KERNELS_DIR / "cpu" / f"{name}.cc"
    if not source.is_file():
        raise KernelBuildError(f"kernel source {source} is missing")
    compiler = _compiler()
    flags = CXX_FLAGS + tuple(extra_flags)
    key = hashlib.sha256()
    # The shared headers too: a source that includes an edited header must be rebuilt.
    headers = sorted((KERNELS_DIR / "cpu").glob("*.h"))
    for part in (source.read_bytes(), *(h.read_bytes() for h in headers),
                 " ".join(flags).encode(), _compiler_identity(compiler).encode(),
                 _cpu_signature().encode()):
        key.update(part)
    target = BUILD_DIR / f"{name}-{key.hexdigest()[:16]}.so"
    if target.is_file():
        if _is_intact(target):
            return str(target)
        log.warning("kernel library %s does not match the SHA-256 its build recorded in %s "
                    "(damaged, or built before checksums were recorded): building it again",
                    target, checksum_record(target))
    try:
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KernelBuildError(f"cannot write the kernel build folder {BUILD_DIR}: {error}") from error
    # A name of this build alone; the compiler creates it, so its mode follows the umask as any
    # `g++ -o` output's does (other users can load it), and it takes the cached name atomically.
    scratch = BUILD_DIR / f".{target.stem}.{os.getpid()}.{uuid.uuid4().hex}.so"
    scratch_record = checksum_record(scratch)
    try:
        command = [compiler, *flags, "-o", str(scratch), str(source)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise KernelBuildError(f"building {source} failed ({' '.join(command)}):\n"
                                   f"{result.stderr.strip()}")
        with open(scratch, "rb") as built:   # on disk before it takes the cached name
            os.fsync(built.fileno())
        scratch_record.write_text(_sha256(scratch) + "\n")
        # The record first: whoever finds the library finds its record. A concurrent build of
        # the same inputs writes the same bytes (no debug information, no embedded paths).
        os.replace(scratch_record, checksum_record(target))
        os.replace(scratch, target)
    finally:
        # failed or interrupted: no scratch file left behind
        scratch.unlink(missing_ok=True)
        scratch_record.unlink(missing_ok=True)
    return str(target)


def aot_op(name: str, function: str, out_shape: Callable, out_dtype: Callable, *,
           bprop: Optional[Callable] = None, extra_flags: Tuple[str, ...] = ()) -> ops.Custom:
    """MindSpore AOT operator for entry point ``function`` of ``kernels/cpu/<name>.cc``.

    Builds (or finds) the library now, so a missing compiler fails where the op is created.
    ``out_shape`` / ``out_dtype`` map the input shapes / dtypes to the output's (MindSpore
    caches the result by input shapes: the inputs must determine the outputs); ``bprop``
    makes the op differentiable.
    """
    library = kernel_library(name, tuple(extra_flags))
    return ops.Custom(f"{library}:{function}", out_shape=out_shape, out_dtype=out_dtype,
                      func_type="aot", bprop=bprop)


def adjoint_pair_op(name: str, forward: str, adjoint: str, out_shape: Callable) -> ops.Custom:
    """Differentiable float32 AOT op ``forward`` (one input x) of ``kernels/cpu/<name>.cc`` whose
    gradient is the entry point ``adjoint`` called as ``adjoint(x, dy)`` -> dx (x's shape)."""
    backward = aot_op(name, adjoint, out_shape=lambda x, _: tuple(x), out_dtype=lambda x, _: x)

    def bprop(x, out, dout):
        return (backward(x, dout),)

    return aot_op(name, forward, out_shape=out_shape, out_dtype=lambda d: d, bprop=bprop)

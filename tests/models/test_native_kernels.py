"""Building the C++ kernel libraries (``native_kernels.kernel_library``): the cache's key,
clear errors, no scratch left behind, and damaged libraries rebuilt rather than loaded."""
import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from instaboost.models.layers import native_kernels


@pytest.fixture
def fresh_cache():
    """kernel_library's per-process cache cleared before and after (each test builds anew)."""
    native_kernels.kernel_library.cache_clear()
    yield
    native_kernels.kernel_library.cache_clear()


@pytest.mark.usefixtures("fresh_cache")
def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(native_kernels.KernelBuildError, match="conv_impl"):
        native_kernels.kernel_library("winograd_conv3x3")


@pytest.mark.usefixtures("fresh_cache")
def test_interrupted_build_leaves_no_scratch_file(monkeypatch):
    real_run = native_kernels.subprocess.run

    def interrupted_compile(command, *args, **kwargs):
        if "-o" in command:   # Ctrl-C while the compiler writes its output
            Path(command[command.index("-o") + 1]).write_bytes(b"\x7fELF partial")
            raise KeyboardInterrupt
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(native_kernels.subprocess, "run", interrupted_compile)
    # a flag no cached build has, so the library is built now
    flags = ("-DINTERRUPTED_BUILD_TEST",)
    before = set(native_kernels.BUILD_DIR.iterdir())
    with pytest.raises(KeyboardInterrupt):
        native_kernels.kernel_library("all_finite", flags)
    assert set(native_kernels.BUILD_DIR.iterdir()) == before   # no scratch library or record


def test_another_compiler_version_at_the_same_path_gets_its_own_build(monkeypatch, tmp_path):
    """The build hash covers what the compiler says it is, not only its path (an upgraded g++)."""
    real = shutil.which("g++") or shutil.which("c++")
    if real is None:
        pytest.skip("no C++ compiler on this machine")
    compiler = tmp_path / "g++"
    libraries = []
    for version in ("g++ (fake) 1.0", "g++ (fake) 2.0"):
        compiler.write_text(f'#!/bin/sh\n[ "$1" = "--version" ] && {{ echo "{version}"; exit 0; }}\n'
                            f'exec {real} "$@"\n')
        compiler.chmod(0o755)
        monkeypatch.setenv("CXX", str(compiler))
        native_kernels.kernel_library.cache_clear()
        native_kernels._compiler_identity.cache_clear()
        try:
            libraries.append(Path(native_kernels.kernel_library("all_finite")))
        finally:
            native_kernels.kernel_library.cache_clear()
    umask = os.umask(0)
    os.umask(umask)
    try:
        assert libraries[0] != libraries[1] and all(path.is_file() for path in libraries)
        # loadable by every user the umask allows, as a library `g++ -o` writes (not mkstemp's 0600)
        assert all(stat.S_IMODE(path.stat().st_mode) == 0o755 & ~umask for path in libraries)
    finally:
        for path in libraries:
            path.unlink(missing_ok=True)
            native_kernels.checksum_record(path).unlink(missing_ok=True)


@pytest.mark.usefixtures("fresh_cache")
@pytest.mark.parametrize("damage", ["truncated", "unrecorded"])
def test_a_damaged_library_is_built_again_not_loaded(damage):
    """A truncated library passes dlopen and kills the process with SIGBUS at its first call; a
    library without its build's checksum record (built before records existed) is not trusted."""
    flags = ("-DDAMAGED_LIBRARY_TEST",)   # a build of this test alone
    library = Path(native_kernels.kernel_library("all_finite", flags))
    record = native_kernels.checksum_record(library)
    try:
        built = library.read_bytes()
        if damage == "truncated":
            library.write_bytes(built[:len(built) // 2])
        else:
            record.unlink()
        native_kernels.kernel_library.cache_clear()
        assert Path(native_kernels.kernel_library("all_finite", flags)) == library
        assert library.read_bytes() == built
        assert record.read_text().split() == [hashlib.sha256(built).hexdigest()]
    finally:
        library.unlink(missing_ok=True)
        record.unlink(missing_ok=True)

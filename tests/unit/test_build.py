"""Kernel build cache: a lock left by a killed build must not hang the next process; builds are keyed by content,
by the instruction-set level they are built for, and by the toolchain."""
import os

import pytest

from ferry.ops import build, cpu
from ferry.ops.cpu import Isa


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next(fake_compiler, tmp_path):
    """cpp_extension's lock file, left by a process killed inside load(), would make every later load wait on it
    forever; under ferry's own lock (released by the OS with its holder) it is known to be a leftover."""
    d = build.build_folder("ferry_fused", ["fused.cpp"], ["-O3"], Isa.PORTABLE)
    d.mkdir(parents=True)
    (d / "lock").touch()
    assert build.load_extension("ferry_fused", ["fused.cpp"], ["-O3"], Isa.PORTABLE) is not None
    assert not (d / "lock").exists() and len(fake_compiler) == 1


def test_builds_of_one_folder_are_serialized_across_processes(tmp_path):
    import fcntl

    (tmp_path / "ferry.lock").touch()
    with build._folder_lock(tmp_path):  # another process cannot take it meanwhile
        with open(tmp_path / "ferry.lock") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "ferry.lock") as f:  # released afterwards
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.fixture
def fake_compiler(tmp_path, monkeypatch):
    """Builds into tmp_path without compiling: each cpp_extension.load call's arguments are recorded."""
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "_modules", {})
    seen = []
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kw: seen.append(kw) or object())
    return seen


def test_build_folder_is_keyed_by_source_content(fake_compiler):
    build.load_extension("ferry_fused", ["fused.cpp"], ["-O3"], Isa.PORTABLE)
    build._modules.clear()
    build.load_extension("ferry_fused", ["fused.cpp"], ["-O2"], Isa.PORTABLE)  # other flags: another folder
    d1, d2 = (kw["build_directory"] for kw in fake_compiler)
    assert d1 != d2
    for kw in fake_compiler:  # compiles the copy kept in its folder, identical to the package's source
        (src,) = kw["sources"]
        assert os.path.dirname(src) == kw["build_directory"]
        assert open(src, "rb").read() == (build.HERE / "fused.cpp").read_bytes()


def test_build_folder_and_flags_are_keyed_by_the_isa_level(fake_compiler):
    """A cache shared by machines of different CPUs must never hand one a build using instructions it lacks."""
    for level in Isa:
        build.load_extension("ferry_fused", ["fused.cpp"], ["-O3"], level)
    folders = [os.path.basename(kw["build_directory"]) for kw in fake_compiler]
    assert len(set(folders)) == len(Isa)
    for level, folder, kw in zip(Isa, folders, fake_compiler):
        assert folder.startswith(f"ferry_fused-{level.label}-")
        assert kw["name"] == f"ferry_fused_{level.label}"  # one module name per level: no torch renaming
        assert f"-DFERRY_ISA_LEVEL={int(level)}" in kw["extra_cflags"]
        assert ("-mavx2" in kw["extra_cflags"]) == (level >= Isa.AVX2)
        assert ("-mavx512f" in kw["extra_cflags"]) == (level >= Isa.AVX512)
        assert ("-mavx512bf16" in kw["extra_cflags"]) == (level >= Isa.AVX512_BF16)
    build.load_extension("ferry_fused", ["fused.cpp"], ["-O3"], Isa.AVX2)
    assert len(fake_compiler) == len(Isa)  # loaded once per process and level


def test_a_different_ferry_isa_builds_into_a_different_folder(fake_compiler, monkeypatch):
    from ferry.ops import fused
    from ferry.ops.kernel import NativeKernel

    kernel = NativeKernel("ferry_fused", ["fused.cpp"], fused.KERNEL.cflags)
    folders = []
    for text in ("portable", "avx2"):
        monkeypatch.setenv(cpu.ENV, text)
        cpu.isa.cache_clear()
        try:
            if cpu.isa() != Isa.parse(text):
                pytest.skip(f"CPU lacks {text} (avx2, fma, f16c)")
            assert kernel.ext() is not None
        finally:
            cpu.isa.cache_clear()
        folders.append(fake_compiler[-1]["build_directory"])
    assert folders[0] != folders[1] and "-portable-" in folders[0] and "-avx2-" in folders[1]


def test_build_folder_is_keyed_by_the_toolchain(fake_compiler, monkeypatch):
    """Two virtual environments (torch in other folders) building the same sources must not take turns
    recompiling one folder: their build commands differ, so each would see the other's build as stale."""
    here = build.build_folder("ferry_fused", ["fused.cpp"], ["-O3"], Isa.PORTABLE)
    other = [*build.toolchain()]
    other[1] = "/elsewhere/.venv/lib/python3.11/site-packages/torch"
    monkeypatch.setattr(build, "toolchain", lambda: other)
    assert build.build_folder("ferry_fused", ["fused.cpp"], ["-O3"], Isa.PORTABLE) != here

"""Kernel build cache: a lock left by a killed build must not hang the next process; builds are keyed by content."""
import os
import time

from ferry.ops import build


def test_stale_lock_is_removed_fresh_lock_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    build._clear_stale_lock(lock)
    assert lock.exists()  # a build may be running right now
    old = time.time() - build.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    build._clear_stale_lock(lock)
    assert not lock.exists()
    build._clear_stale_lock(lock)  # nothing to remove: no error


def test_build_folder_is_keyed_by_source_content(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "_modules", {})
    seen = []
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kw: seen.append(kw) or object())
    build.load_extension("ferry_fused", ["fused.cpp"], ["-O3"])
    build._modules.clear()
    build.load_extension("ferry_fused", ["fused.cpp"], ["-O2"])  # other flags: another folder
    d1, d2 = (kw["build_directory"] for kw in seen)
    assert d1 != d2
    for kw in seen:  # compiles the copy kept in its folder, identical to the package's source
        (src,) = kw["sources"]
        assert os.path.dirname(src) == kw["build_directory"]
        assert open(src, "rb").read() == (build.HERE / "fused.cpp").read_bytes()

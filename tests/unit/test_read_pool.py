"""ferry.tiers.read_pool: the native reader pool and its Python-thread stand-in behave alike."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from ferry.tiers.read_pool import ThreadReadPool, read_pool


@pytest.fixture(params=["native", "threads"])
def pool(request):
    p = read_pool(2) if request.param == "native" else ThreadReadPool(2)
    if request.param == "native" and isinstance(p, ThreadReadPool):
        pytest.skip("the C++ extension cannot be built here")
    yield p
    p.close()


def _wait_all(pool, tickets) -> dict:
    out = {}
    while len(out) < len(tickets):
        out.update({t: rest for t, *rest in pool.wait()})
    return out


def test_reads_land_in_the_buffers_and_are_reported(pool, tmp_path):
    data = os.urandom(64 << 10)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        bufs = [torch.zeros(16 << 10, dtype=torch.uint8) for _ in range(4)]
        tickets = [pool.submit(fd, b.data_ptr(), b.numel(), i * (16 << 10), i % 2 == 0, False)
                   for i, b in enumerate(bufs)]
        done = _wait_all(pool, tickets)
        assert sorted(done) == sorted(tickets) and pool.pending() == 0
        for i, (t, b) in enumerate(zip(tickets, bufs)):
            nbytes, err, seconds = done[t]
            assert (nbytes, err) == (16 << 10, 0) and seconds >= 0
            assert bytes(b.numpy()) == data[i * (16 << 10):(i + 1) * (16 << 10)]
        assert pool.reap() == []  # each read is reported once
    finally:
        os.close(fd)


def test_short_reads_and_errors_are_reported_not_raised(pool, tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 1000)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    buf = torch.zeros(4096, dtype=torch.uint8)
    try:
        short = pool.submit(fd, buf.data_ptr(), 4096, 0, True, False)
        (t, nbytes, err, _), = pool.wait(short)
        assert (t, nbytes, err) == (short, 1000, 0)  # the file ended: fewer bytes, no error
    finally:
        os.close(fd)
    bad = pool.submit(fd, buf.data_ptr(), 4096, 0, True, False)  # a closed descriptor
    (t, nbytes, err, _), = pool.wait(bad)
    assert (t, nbytes, err) == (bad, 0, errno.EBADF)


def test_a_queued_prefetch_can_be_moved_ahead_and_a_closed_pool_refuses_work(pool, tmp_path):
    (tmp_path / "f").write_bytes(os.urandom(1 << 20))
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    buf = torch.zeros(1 << 20, dtype=torch.uint8)
    try:
        # 256 reads of 1 MiB: two threads take tens of ms even from the page cache, so the last is still queued
        # when asked (with 32, an idle machine sometimes finished them all first)
        tickets = [pool.submit(fd, buf.data_ptr(), 1 << 20, 0, False, False) for _ in range(256)]
        assert pool.prioritize(tickets[-1])
        _wait_all(pool, tickets)
        assert not pool.prioritize(tickets[-1])  # finished: nothing to move
    finally:
        os.close(fd)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(0, buf.data_ptr(), 1, 0, True, False)

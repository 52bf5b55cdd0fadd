"""The copy cost of a swap (part of `python -m bench fairness`): moving a request's KV blocks between the device pool
and the host pool block by block (one copy per block), as one gather + scatter (`index_select` / `index_copy_`, what
ferry did before block groups), and in block groups (one copy per run of contiguous blocks, FastSwitch; what
`ferry/runner/kv/storage.py` does now). Cases: the blocks in one contiguous run, and scattered (every other block,
the worst case for groups: runs of one).

Legend: L layers, N device blocks, bs block size, K kv heads, Dh head dim. The KV tensor is [L, 2, N, bs, K, Dh], as
`full`'s; the host pool has the same shape. Timings interleave the three ways in one run (bench/common.py)."""
from __future__ import annotations

import time
from typing import Callable

import torch

from bench.common import interleaved, summary
from ferry.runner.kv.storage import block_runs

SHAPES = {  # name: (L, K, Dh, bs, dtype): the KV of one layer stack, a real model's shape
    "qwen2.5-0.5b": (24, 2, 64, 16, torch.bfloat16),
    "llama-3.2-1b": (16, 8, 64, 16, torch.bfloat16),
}


def _ways(dev: torch.Tensor, host: torch.Tensor, pairs: list[tuple[int, int]]) -> dict[str, Callable[[], float]]:
    """Each way copies the same (device, host) pairs from dev to host and returns its seconds."""
    src = torch.tensor([d for d, _ in pairs])
    dst = torch.tensor([h for _, h in pairs])
    runs = block_runs(pairs)

    def timed(fn: Callable[[], None]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return run

    def per_block() -> None:
        for d, h in pairs:
            host[:, :, h].copy_(dev[:, :, d])

    def gather() -> None:
        host.index_copy_(2, dst, dev.index_select(2, src))

    def groups() -> None:
        for s, d, n in runs:
            host.narrow(2, d, n).copy_(dev.narrow(2, s, n))

    return {"per_block": timed(per_block), "gather_scatter": timed(gather), "block_groups": timed(groups)}


def measure(num_blocks_list: list[int], runs: int, shapes: list[str]) -> list[dict]:
    """One row per (shape, blocks moved, layout): median seconds of each way, MB moved, and groups' speed-up."""
    rows = []
    for name in shapes:
        L, K, Dh, bs, dtype = SHAPES[name]
        for n in num_blocks_list:
            pool = 2 * n + 2
            dev = torch.randn(L, 2, pool, bs, K, Dh).to(dtype)
            host = torch.zeros_like(dev)
            block_bytes = dev[:, :, 0].numel() * dev.element_size()
            for layout, ids in (("contiguous", list(range(1, n + 1))), ("scattered", list(range(1, 2 * n, 2)))):
                pairs = list(zip(ids, range(n)))
                times = interleaved(_ways(dev, host, pairs), runs)
                assert torch.equal(host[:, :, :n], dev[:, :, ids]), "a copy way moved the wrong blocks"
                med = {k: summary(v)["median"] for k, v in times.items()}
                rows.append({"shape": name, "blocks": n, "layout": layout, "runs": len(block_runs(pairs)),
                             "mb": n * block_bytes / 2**20, "seconds": {k: summary(v) for k, v in times.items()},
                             "groups_vs_gather": med["gather_scatter"] / med["block_groups"],
                             "groups_vs_per_block": med["per_block"] / med["block_groups"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'shape':14} {'blocks':>6} {'layout':11} {'MB':>7} {'per block':>10} {'gather':>10} {'groups':>10} "
             f"{'vs gather':>9}"]
    for r in rows:
        s = {k: 1e3 * v["median"] for k, v in r["seconds"].items()}
        lines.append(f"{r['shape']:14} {r['blocks']:6} {r['layout']:11} {r['mb']:7.1f} {s['per_block']:8.2f}ms "
                     f"{s['gather_scatter']:8.2f}ms {s['block_groups']:8.2f}ms {r['groups_vs_gather']:8.2f}x")
    return "\n".join(lines)

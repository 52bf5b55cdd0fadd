"""bench moe-offload: the engine settings timed at each budget (ferry's modes, int4, the peers), each a worker
in its own memory cgroup, and one measurement of a batch (see bench/moe_offload.py)."""
from __future__ import annotations

import math
import os
import re
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench import memlimit
from bench.engines import Unavailable, start
from bench.engines.worker import Worker, WorkerError

SLACK = 256 << 20
FERRY_MODES = {  # config name -> ferry.LLM options beside the store and its budget
    "ferry auto": dict(expert_eviction="auto", expert_prefetch="auto"),  # the default: chosen online per batch size
    "ferry on-demand": dict(expert_eviction="lru", expert_prefetch="none"),
    "ferry lru+prefetch": dict(expert_eviction="lru", expert_prefetch="pregate"),
    "ferry full": dict(expert_eviction="correlation", expert_prefetch="pregate"),
}
FIXED_MODES = ("ferry on-demand", "ferry lru+prefetch", "ferry full")  # what auto chooses among, fixed
REFERENCE = "ferry in-memory"
PEERS = {"transformers": "accelerate disk offload", "llama.cpp": "llama.cpp mmap"}
INT4_REFERENCE = "ferry int4 in-memory (lossy)"  # the int4 store with every expert in RAM
INT4_FULL = "ferry int4 full (lossy)"  # the int4 store under the bf16 rows' budget, "ferry full" settings
AUTO_BITS = "ferry auto-bits full (lossy)"  # an --expert-bits auto store of the int4 store's size, "ferry full"
GROUPS = "ferry full, groups of"
GROUPS_REFERENCE = "ferry in-memory, groups of"  # the same groups with every expert in RAM: their tokens


def grouped(name: str) -> bool:
    """Decoded as sequential groups (--max-num-seqs below the batch): run at the largest batch only."""
    return name.startswith((GROUPS, GROUPS_REFERENCE))


def reference_of(name: str) -> str:
    """The in-memory run whose tokens a configuration must reproduce (a reference: itself). Groups of k decode
    in batches of k, which round bf16 differently from one batch of 16: their reference decodes the same groups."""
    if grouped(name):
        return name.replace(GROUPS, GROUPS_REFERENCE)
    if name == AUTO_BITS:
        return AUTO_BITS  # its own tokens (lossy): how far they are from the lossless ones is reported
    return INT4_REFERENCE if name in (INT4_FULL, INT4_REFERENCE) else REFERENCE


def column_rank(name: str) -> int:
    """Table order: references, ferry's lossless modes, int4 beside them, grouped decoding, then the peers."""
    order = [REFERENCE, INT4_REFERENCE, *FERRY_MODES, INT4_FULL, AUTO_BITS]
    return order.index(name) if name in order else len(order) + (not grouped(name))


def runtime_bytes(engine: str) -> int:
    """Resident bytes of the engine's worker process after its imports, before a model: what the limit adds."""
    if engine == "llama.cpp":
        from bench.peers.env import peer_python
        py, code = peer_python(), "import numpy, llama_cpp as L; L.llama_backend_init()"
    else:
        py = sys.executable
        code = ("import torch, transformers, accelerate" if engine == "transformers"
                else "import torch, ferry; from ferry import LLM, SamplingParams")
    code += "\nprint(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')))"
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) * 1024


def disk_read_bytes(pid: int) -> int:
    """Bytes this process (all its threads) caused to be read from the block device."""
    try:
        for line in open(f"/proc/{pid}/io"):
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


# -- one configuration: a worker under its memory limit ------------------------------------------------------

class Config:
    """One engine setting at one budget: its worker (started under its cgroup), or why it cannot run."""

    def __init__(self, name: str, engine: str, options: dict, limit: int | None) -> None:
        self.name, self.engine, self.options, self.limit = name, engine, options, limit
        self.worker: Worker | None = None
        self.cgroup: memlimit.MemoryLimit | None = None
        self.why: str | None = None
        self.info: dict = {}

    def start(self, stack: ExitStack, model: Path, dtype: str, threads: int, timeout: float,
              files: list[Path]) -> None:
        memlimit.drop_cache(files)
        prefix = None
        if self.limit is not None:
            self.cgroup = stack.enter_context(memlimit.MemoryLimit(self.limit, re.sub(r"[^A-Za-z0-9_.+-]+", "-", self.name)))
            prefix = self.cgroup.prefix
        try:
            t = time.perf_counter()
            self.worker = stack.enter_context(start(self.engine, model, dtype, threads, prefix=prefix,
                                                    **self.options))
            self.info["load_s"] = time.perf_counter() - t
        except (Unavailable, WorkerError, TimeoutError) as e:
            self.why = self._reason(e)

    def _reason(self, e: Exception) -> str:
        msg = str(e).splitlines()[0][:200]
        if self.cgroup is not None and ("exited (-9)" in msg or "exited (137)" in msg):
            msg = f"killed at the {self.limit / 2**20:.0f} MiB memory limit"
        return msg

    def call(self, op: str, timeout: float, **kw) -> dict:
        assert self.worker is not None
        try:
            return self.worker.call(op, timeout=timeout, **kw)
        except TimeoutError:
            self.why = f"over the {timeout:.0f} s limit per call"
        except (WorkerError, ValueError) as e:
            self.why = self._reason(e)
        raise _Failed()


class _Failed(Exception):
    pass


# 1-token runs per ferry measurement, their median subtracted: a ferry decode of the trained MoE takes tens of ms, so
# one slow 1-token run (a scheduler hiccup) made a single difference read 2-3x its tok/s (or negative); the peers'
# decodes take seconds, one run each
ONE_TOKEN_RUNS = 3


def measure(cfg: Config, prompts: list[list[int]], new_tokens: int, timeout: float) -> dict:
    """Decode tok/s of one batch, and per generated token the disk bytes read (and ferry's expert counters)."""
    B = len(prompts)
    pid = cfg.worker.proc.pid
    ferry = cfg.engine == "ferry"
    io0 = disk_read_bytes(pid)
    one = statistics.median([
        cfg.call("generate", timeout, prompts=[p[::-1] for p in prompts], max_tokens=[1] * B)["seconds"]
        for _ in range(ONE_TOKEN_RUNS if ferry else 1)])
    s1 = cfg.call("expert_stats", timeout) if ferry else {}
    io1 = disk_read_bytes(pid)
    kw = {"return_ids": True} if ferry else {}
    full = cfg.call("generate", timeout, prompts=prompts, max_tokens=[new_tokens] * B, **kw)
    s2 = cfg.call("expert_stats", timeout) if ferry else {}
    io2 = disk_read_bytes(pid)
    tokens = B * (new_tokens - 1)
    seconds = full["seconds"] - one
    # per generated token over the N-token run (its prefill included: one step in N): a difference with the
    # 1-token run would be decode-only but can come out negative, the cache starting in another state
    rec = {"tok_s": tokens / seconds if seconds > 0 else math.nan, "seconds": seconds,
           "disk_bytes_per_token": (io2 - io1) / (B * new_tokens) if io0 >= 0 else None}
    if "token_ids" in full:
        rec["token_ids"] = full["token_ids"]
    if s2:
        d = {k: s2[k] - s1[k] for k in ("lookups", "hits", "bytes_read", "stall_seconds", "num_predicted",
                                        "num_predicted_used", "num_needed", "num_offload_switches")}
        tokens = B * new_tokens
        rec.update(lookups_per_step=d["lookups"] / new_tokens, num_slots=s2["num_slots"],
                   hit_rate=d["hits"] / d["lookups"] if d["lookups"] > 0 else None,
                   prefetch_precision=d["num_predicted_used"] / d["num_predicted"] if d["num_predicted"] > 0 else None,
                   prefetch_recall=d["num_predicted_used"] / d["num_needed"] if d["num_needed"] > 0 else None,
                   expert_bytes_per_token=d["bytes_read"] / tokens, stall_ms_per_token=1e3 * d["stall_seconds"] / tokens,
                   cache_nbytes=s2["cache_nbytes"], io_mode=s2["io_mode"],
                   offload_setting=s2["offload_setting"], offload_switches=d["num_offload_switches"])
    return rec


# -- the scenario ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """What the memory limits and the ferry budgets are computed from, for one model."""

    nonexpert: int  # bytes of the non-expert weights
    experts: int  # bytes of the experts in the run's dtype
    layer_bytes: int  # one decoder layer's weights
    store: Path  # lossless expert store
    store_bytes: int
    int4_store: Path | None  # int4 expert store (None: no int4 rows)
    auto_store: Path | None  # --expert-bits auto store of the int4 store's bytes (None: no auto-bits rows)
    runtime: dict[str, int]  # engine -> resident bytes after its imports ({} without limits)
    limits: bool  # cgroup memory limits


def reference_configs(engines: list[str], sz: Sizes, klotski: int | None) -> list[Config]:
    """Every expert in RAM: ferry with its experts resident (also in sequential groups of `klotski` sequences, the
    reference of the offloaded groups), and the int4 store with every expert cached."""
    out = []
    if "ferry" in engines:
        lim = sz.runtime["ferry"] + sz.nonexpert + sz.experts + SLACK if sz.limits else None
        out.append(Config(REFERENCE, "ferry", dict(kv_cache_memory="64M", max_num_seqs=16), lim))
        if klotski:
            out.append(Config(f"{GROUPS_REFERENCE} {klotski}", "ferry",
                              dict(kv_cache_memory="64M", max_num_seqs=klotski), lim))
        if sz.int4_store is not None:
            from ferry.experts.layout import StoreIndex
            int4_bytes = StoreIndex.load(sz.int4_store).total_nbytes
            lim = sz.runtime["ferry"] + sz.nonexpert + int4_bytes + SLACK if sz.limits else None
            out.append(Config(INT4_REFERENCE, "ferry", dict(kv_cache_memory="64M", max_num_seqs=16,
                                                            expert_store=str(sz.int4_store)), lim))
    return out


def configs_for(budget: float, engines: list[str], sz: Sizes, klotski: int | None, work: Path) -> list[Config]:
    """Every engine setting at this budget (fraction of the lossless expert bytes in RAM), each with its memory
    limit. The int4 rows get the same RAM as the bf16 ones (budget x the lossless store's bytes)."""
    def limit(engine: str) -> int | None:
        return sz.runtime[engine] + sz.nonexpert + int(budget * sz.experts) + SLACK if sz.limits else None

    ferry_common = dict(kv_cache_memory="64M", max_num_seqs=16, expert_store=str(sz.store),
                        expert_cache_memory=max(int(budget * sz.store_bytes), 1))
    out = []
    if "ferry" in engines:
        out += [Config(n, "ferry", {**ferry_common, **o}, limit("ferry")) for n, o in FERRY_MODES.items()]
        if sz.int4_store is not None and budget < 1:
            out.append(Config(INT4_FULL, "ferry", {**ferry_common, **FERRY_MODES["ferry full"],
                                                   "expert_store": str(sz.int4_store)}, limit("ferry")))
        if sz.auto_store is not None and budget < 1:  # the same bytes as int4, each expert's format chosen
            out.append(Config(AUTO_BITS, "ferry", {**ferry_common, **FERRY_MODES["ferry full"],
                                                   "expert_store": str(sz.auto_store)}, limit("ferry")))
        if klotski:  # the largest batch decoded as sequential groups of `klotski` sequences (--max-num-seqs)
            out.append(Config(f"{GROUPS} {klotski}", "ferry",
                              {**ferry_common, **FERRY_MODES["ferry full"], "max_num_seqs": klotski}, limit("ferry")))
    if "transformers" in engines:
        opts = {"batch_size": 16}
        if budget < 1:  # minus one layer: the disk layer a forward loads is anonymous memory on top of max_memory
            opts.update(max_cpu_memory=max(sz.nonexpert + int(budget * sz.experts) - sz.layer_bytes, 1),
                        offload_folder=str(work / f"offload-{budget:g}-{os.getpid()}"))
        out.append(Config(PEERS["transformers"], "transformers", opts, limit("transformers")))
    if "llama.cpp" in engines:
        out.append(Config(PEERS["llama.cpp"], "llama.cpp", {"mmap": True}, limit("llama.cpp")))
    return out

"""Scenario moe-offload: decode throughput of a MoE whose experts live on disk, against the RAM budget for them.

Question: with only 100/50/25/12.5% of the experts' bytes allowed in RAM, how much of the all-in-memory decode
speed is left, at batch 1 and 16, for ferry's (a) on-demand loading, (b) LRU + pre-gating prefetch, (c) full
setting (correlation-aware eviction + pre-gating prefetch, planner-sized), and for what a user would try
instead: transformers + accelerate disk offload (`device_map="auto"`, `max_memory`, `offload_folder`) and
llama.cpp with its model mmapped?

Same memory for everyone (bench/memlimit.py): each engine's worker runs in its own memory cgroup whose limit
(anonymous memory + page cache) is

    limit = runtime(engine) + non-expert weight bytes + budget x expert weight bytes + SLACK

runtime(engine) is the engine's resident memory after its imports, before any model (measured at the start);
SLACK (KV cache, activations, allocator) is the same for all. ferry's expert cache gets budget x its store's
bytes and reads with O_DIRECT; the peers read through the page cache, which the cgroup caps; each worker starts
with the model files evicted from the page cache (posix_fadvise DONTNEED). Every engine also reports the bytes
its process read from the block device (/proc/PID/io read_bytes) per generated token.

Two models:
  - random: OLMoE-shaped, random weights (bench/models.py writer; RANDOM_SHAPE below, ~1 GB in bf16, 8 layers of
    32 experts, top-4: OLMoE's 1:8 sparsity), for speed; ferry, transformers/accelerate, llama.cpp (bf16 GGUF of
    the same safetensors). Greedy float32 parity of the three before timing (bench/peers/parity.py).
  - trained: ferry/assets/ferry-tiny-moe (Mixtral, 8 experts top-2, experts ~3 MB) on held-out text, for what
    random routing cannot show: prefetch precision / recall and hit rate with realistic routing. ferry only.
Every ferry offload run must give the same greedy tokens as ferry with every expert in memory (`token_exact`).
Decode tok/s = B x (N - 1) / (time of N tokens - time of 1 token), prompts of 16 tokens, after a warm-up; the
counters per token (hit rate, bytes read, stall) are over the N-token run.

    python -m bench moe-offload                    # ~15 min on 2 idle cores (first run: builds, converts, exports)
    python -m bench moe-offload --smoke            # tiny model, 1 thread, seconds
    python -m bench moe-offload --engines ferry --budgets 0.25 --batches 16 --no-parity --trained none

Writes bench/results/moe_offload.json (+ .png: throughput against budget) and fills the README's
`<!-- BENCH:moe-offload -->` block through `python -m bench report`."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from bench import memlimit
from bench.common import new_record, result_path, summary
from bench.engines import Unavailable, start
from bench.engines.worker import Worker, WorkerError

ROOT = Path(__file__).resolve().parent
WORK = ROOT / ".cache" / "moe_offload"
TRAINED = ROOT.parent / "ferry" / "assets" / "ferry-tiny-moe"
SLACK = 256 << 20
RANDOM_NAME = "olmoe-32e-1g"
RANDOM_SHAPE = dict(architectures=["OlmoeForCausalLM"], model_type="olmoe", hidden_size=1024, intermediate_size=512,
                    num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, num_experts=32,
                    num_experts_per_tok=4, norm_topk_prob=False, clip_qkv=None, max_position_embeddings=4096,
                    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, vocab_size=32000)
FERRY_MODES = {  # config name -> ferry.LLM options beside the store and its budget
    "ferry on-demand": dict(expert_eviction="lru", expert_prefetch="none"),
    "ferry lru+prefetch": dict(expert_eviction="lru", expert_prefetch="pregate"),
    "ferry full": dict(expert_eviction="correlation", expert_prefetch="pregate"),
}
REFERENCE = "ferry in-memory"
PEERS = {"transformers": "accelerate disk offload", "llama.cpp": "llama.cpp mmap"}
QUESTION = ("decode tok/s of a MoE with experts on disk and a RAM budget for them, ferry's modes against "
            "accelerate disk offload and llama.cpp mmap under the same memory limit")


# -- models ---------------------------------------------------------------------------------------------------

def random_model(smoke: bool) -> Path:
    from bench import models
    if smoke:
        from bench.peers.tiny import build_tiny
        return build_tiny("tiny-olmoe")
    models.SHAPES.setdefault(RANDOM_NAME, RANDOM_SHAPE)
    return bf16_copy(models.build(RANDOM_NAME))


def bf16_copy(src: Path) -> Path:
    """The checkpoint with bfloat16 tensors (bench/models.py writes float32): the engines run bf16, and every
    worker start would otherwise read and convert twice the bytes. Built once, beside the source."""
    import torch
    from safetensors.torch import load_file, save_file
    dst = src.with_name(src.name + "-bf16")
    if (dst / "config.json").is_file():  # written last
        return dst
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(dst / f.name))
        elif f.name != "config.json":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16", "torch_dtype": "bfloat16"}, indent=2))
    return dst


def weight_bytes(model: Path, dtype_bytes: int = 2) -> tuple[int, int]:
    """(non-expert, expert) weight bytes of the checkpoint at dtype_bytes per parameter."""
    from safetensors import safe_open
    rest = experts = 0
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                n = math.prod(st.get_slice(name).get_shape()) * dtype_bytes
                if ".experts." in name or "block_sparse_moe.experts" in name:
                    experts += n
                else:
                    rest += n
    return rest, experts


def expert_store(model: Path, dtype: str) -> Path:
    from ferry.experts.convert import convert_expert_store
    store = WORK / f"{model.name}-{dtype}.experts"
    if not (store / "index.json").exists():
        convert_expert_store(model, store, dtype)
    return store


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
            self.cgroup = stack.enter_context(memlimit.MemoryLimit(self.limit, self.name.replace(" ", "-")))
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


def prompts_random(vocab: int, batch: int, seed: int, length: int = 16) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


def prompts_text(model: Path, batch: int, seed: int, length: int = 16) -> list[list[int]]:
    """batch spans of `length` tokens of held-out text (realistic routing for a trained model)."""
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(model / "tokenizer.json")).encode(
        (ROOT.parent / "ferry" / "assets" / "heldout.txt").read_text()[:200_000]).ids
    step = max((len(ids) - length) // (4 * batch + 1), 1)
    return [ids[(seed * batch + i) * step:(seed * batch + i) * step + length] for i in range(batch)]


def measure(cfg: Config, prompts: list[list[int]], new_tokens: int, timeout: float) -> dict:
    """Decode tok/s of one batch, and per generated token the disk bytes read (and ferry's expert counters)."""
    B = len(prompts)
    pid = cfg.worker.proc.pid
    ferry = cfg.engine == "ferry"
    io0 = disk_read_bytes(pid)
    one = cfg.call("generate", timeout, prompts=[p[::-1] for p in prompts], max_tokens=[1] * B)["seconds"]
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
                                        "num_predicted_used", "num_needed")}
        tokens = B * new_tokens
        rec.update(hit_rate=d["hits"] / d["lookups"] if d["lookups"] > 0 else None,
                   prefetch_precision=d["num_predicted_used"] / d["num_predicted"] if d["num_predicted"] > 0 else None,
                   prefetch_recall=d["num_predicted_used"] / d["num_needed"] if d["num_needed"] > 0 else None,
                   expert_bytes_per_token=d["bytes_read"] / tokens, stall_ms_per_token=1e3 * d["stall_seconds"] / tokens,
                   cache_nbytes=s2["cache_nbytes"], io_mode=s2["io_mode"])
    return rec


# -- the scenario ---------------------------------------------------------------------------------------------

def configs_for(budget: float, engines: list[str], nonexpert: int, experts: int, layer_bytes: int, store: Path,
                store_bytes: int, runtime: dict[str, int], klotski: int | None, work: Path,
                limits: bool) -> list[Config]:
    """Every engine setting at this budget (fraction of expert bytes in RAM), each with its memory limit."""
    def limit(engine: str) -> int | None:
        return runtime[engine] + nonexpert + int(budget * experts) + SLACK if limits else None

    ferry_common = dict(kv_cache_memory="64M", max_num_seqs=16, expert_store=str(store),
                        expert_cache_memory=max(int(budget * store_bytes), 1))
    out = []
    if "ferry" in engines:
        out += [Config(n, "ferry", {**ferry_common, **o}, limit("ferry")) for n, o in FERRY_MODES.items()]
        if klotski:  # the largest batch decoded as sequential groups of `klotski` sequences (--max-num-seqs)
            out.append(Config(f"ferry full, groups of {klotski}", "ferry",
                              {**ferry_common, **FERRY_MODES["ferry full"], "max_num_seqs": klotski}, limit("ferry")))
    if "transformers" in engines:
        opts = {"batch_size": 16}
        if budget < 1:  # minus one layer: the disk layer a forward loads is anonymous memory on top of max_memory
            opts.update(max_cpu_memory=max(nonexpert + int(budget * experts) - layer_bytes, 1),
                        offload_folder=str(work / f"offload-{budget:g}-{os.getpid()}"))
        out.append(Config(PEERS["transformers"], "transformers", opts, limit("transformers")))
    if "llama.cpp" in engines:
        out.append(Config(PEERS["llama.cpp"], "llama.cpp", {"mmap": True}, limit("llama.cpp")))
    return out


def run_model(label: str, model: Path, args, engines: list[str], text_prompts: bool, record: dict) -> dict:
    """Every budget x config x batch on one model; returns the model's part of the record."""
    from bench.engines import GGUF_TYPES
    t0 = time.perf_counter()
    budgets = [float(b) for b in args.budgets.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    store = expert_store(model, args.dtype)
    from ferry.experts.layout import StoreIndex
    store_bytes = StoreIndex.load(store).total_nbytes
    nonexpert, experts = weight_bytes(model, 4 if args.dtype == "float32" else 2)
    cfg = json.loads((model / "config.json").read_text())
    embeddings = cfg["vocab_size"] * cfg["hidden_size"] * (4 if args.dtype == "float32" else 2)
    embeddings *= 1 if cfg.get("tie_word_embeddings") else 2
    layer_bytes = (nonexpert - embeddings + experts) // cfg["num_hidden_layers"]  # one decoder layer's weights
    files = [model, store]
    if "llama.cpp" in engines:
        from bench.peers.gguf_export import ensure
        try:
            files.append(ensure(model, GGUF_TYPES[args.dtype]))
        except NotImplementedError:
            pass  # the llama.cpp config says why when it starts
    limits = not args.no_limit and memlimit.available() is None
    runtime = {e: runtime_bytes(e) for e in engines} if limits else {}
    part = {"model": str(model), "model_name": model.name, "model_config": cfg, "nonexpert_bytes": nonexpert,
            "expert_bytes": experts, "store_bytes": store_bytes, "runtime_bytes": runtime, "slack_bytes": SLACK,
            "memory_limit": "cgroup" if limits else f"none ({args.no_limit and '--no-limit' or memlimit.available()})",
            "budgets": budgets, "batches": batches, "new_tokens": args.new_tokens, "cases": [], "plans": {}}
    record["models"][label] = part
    if not args.no_parity and len(engines) > 1:
        from bench.peers.parity import check, describe
        r = check(model, engines, args.threads)
        part["parity_float32"] = r
        print(f"[moe-offload] {label}: float32 parity: {describe(r)}", flush=True)
        if not r["ok"]:
            raise SystemExit("[moe-offload] engines disagree with ferry at float32; not timing (see the JSON)")
    vocab = cfg["vocab_size"]
    prompt_sets = {B: (prompts_text(model, B, 0) if text_prompts else prompts_random(vocab, B, 0)) for B in batches}
    warm = {B: (prompts_text(model, B, 1) if text_prompts else prompts_random(vocab, B, 1)) for B in batches}
    with ExitStack() as outer:
        ref = None
        if "ferry" in engines:  # every expert in memory: the reference of speed and tokens, kept for all budgets
            ref = Config(REFERENCE, "ferry", dict(kv_cache_memory="64M", max_num_seqs=16),
                         runtime["ferry"] + nonexpert + experts + SLACK if limits else None)
            ref.start(outer, model, args.dtype, args.threads, args.timeout, files)
            if ref.worker:
                ref.call("generate", args.timeout, prompts=warm[max(batches)], max_tokens=[2] * max(batches))
        ref_ids: dict[int, list] = {}
        for budget in budgets:
            klotski = args.klotski if budget <= 0.25 and 0 < args.klotski < max(batches) else None
            confs = configs_for(budget, engines, nonexpert, experts, layer_bytes, store, store_bytes, runtime,
                                klotski, WORK, limits)
            def timeout_of(c: Config) -> float:
                return args.timeout if c.engine == "ferry" else args.peer_timeout

            with ExitStack() as stack:
                for c in confs:
                    c.start(stack, model, args.dtype, args.threads, args.timeout, files)
                    if c.worker is None:
                        print(f"[moe-offload] {label} budget {budget:g} {c.name}: n/a ({c.why})", flush=True)
                        continue
                    try:
                        if c.name == "ferry full" and budget < 1:
                            plan = c.call("expert_plan", args.timeout, max_num_seqs=16)
                            part["plans"][f"{budget:g}"] = plan
                        if c.engine == "transformers":
                            c.info["placement"] = c.call("placement", args.timeout)["counts"]
                        c.call("generate", timeout_of(c), prompts=warm[max(batches)], max_tokens=[2] * max(batches))
                    except _Failed:
                        print(f"[moe-offload] {label} budget {budget:g} {c.name}: n/a ({c.why})", flush=True)
                runs: dict[tuple[str, int], list[dict]] = {}
                order = ([ref] if ref and ref.worker else []) + confs
                for r in range(args.runs):
                    for c in order[r % len(order):] + order[:r % len(order)]:  # rotating first config
                        for B in batches:
                            if c.worker is None or c.why or (c.name.startswith("ferry full, groups") and B < max(batches)):
                                continue
                            try:
                                m = measure(c, prompt_sets[B], args.new_tokens, timeout_of(c))
                            except _Failed:
                                continue
                            m["round"] = r
                            runs.setdefault((c.name, B), []).append(m)
                for B in batches:
                    case = {"budget": budget, "batch": B, "configs": {}}
                    for c in order:
                        ms = runs.get((c.name, B), [])
                        if not ms:
                            if not (c.name.startswith("ferry full, groups") and B < max(batches)):
                                case["configs"][c.name] = {"unavailable": c.why or "not run"}
                            continue
                        ids = [m.pop("token_ids", None) for m in ms]
                        if c is ref:
                            ref_ids[B] = ids[0]
                        s = summary([m["tok_s"] for m in ms])
                        s["measurements"] = ms
                        for key in ("hit_rate", "prefetch_precision", "prefetch_recall", "expert_bytes_per_token",
                                    "stall_ms_per_token", "disk_bytes_per_token"):
                            vals = [m[key] for m in ms if m.get(key) is not None]
                            if vals:
                                s[key] = sorted(vals)[len(vals) // 2]
                        if c.engine == "ferry" and c is not ref and ids[0] is not None and B in ref_ids:
                            s["token_exact"] = all(i == ref_ids[B] for i in ids)
                        if c.cgroup is not None:
                            s.update(limit_bytes=c.limit, peak_bytes=c.cgroup.peak_bytes,
                                     limit_hits=c.cgroup.failcnt)
                        s.update({k: v for k, v in c.info.items() if k != "load_s"})
                        case["configs"][c.name] = s
                    add_ratios(case)
                    part["cases"].append(case)
                    show = {n: (round(v["median"], 1) if "median" in v else v["unavailable"])
                            for n, v in case["configs"].items()}
                    print(f"[moe-offload] {label} budget {budget:g} batch {B}: {show}", flush=True)
            for c in confs:  # accelerate's offload folder holds a copy of the offloaded weights
                folder = c.options.get("offload_folder")
                if folder:
                    shutil.rmtree(folder, ignore_errors=True)
    part["duration_s"] = time.perf_counter() - t0
    return part


def add_ratios(case: dict) -> None:
    """Per round: ferry full / reference (all in memory) and ferry full / each peer; summaries of them."""
    by_round = {n: {m["round"]: m["tok_s"] for m in v.get("measurements", [])} for n, v in case["configs"].items()}
    full = by_round.get("ferry full", {})
    ratios = {}
    for other in [REFERENCE, *PEERS.values(), "ferry on-demand", "ferry lru+prefetch"]:
        vals = [full[r] / by_round[other][r] for r in full if r in by_round.get(other, {}) and by_round[other][r] > 0]
        if vals:
            ratios[f"ferry full / {other}"] = summary(vals)
    case["ratios"] = ratios


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = list(record["models"].items())
    batches = sorted({c["batch"] for _, p in parts for c in p["cases"]})
    fig, axes = plt.subplots(len(parts), len(batches), figsize=(5.2 * len(batches), 3.8 * len(parts)), squeeze=False)
    for i, (label, p) in enumerate(parts):
        for j, B in enumerate(batches):
            ax = axes[i][j]
            cases = [c for c in p["cases"] if c["batch"] == B]
            names = list(dict.fromkeys(n for c in cases for n in c["configs"]))
            for n in names:
                pts = [(100 * c["budget"], c["configs"][n]["median"]) for c in cases
                       if "median" in c["configs"].get(n, {})]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                if n == REFERENCE:
                    ax.axhline(sorted(ys)[len(ys) // 2], color="k", ls="--", lw=1, label=n)
                else:
                    ax.plot(xs, ys, marker="o", label=n)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks([12.5, 25, 50, 100], ["12.5", "25", "50", "100"])
            ax.set_xlabel("expert budget, % of expert bytes in RAM")
            ax.set_ylabel("decode tok/s")
            ax.set_title(f"{p['model_name']}: batch {B}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6)
    fig.suptitle(f"moe-offload: {record['config']['threads']} threads, {record['config']['dtype']}, same memory "
                 "limit per engine", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def _f(x, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if pct:
        return f"{100 * x:.0f}%"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def markdown(rec: dict) -> str:
    """The README block: per model a throughput table (tok/s, ratios) and ferry full's expert counters."""
    out = []
    for label, p in rec["models"].items():
        names = list(dict.fromkeys(n for c in p["cases"] for n in c["configs"]))
        ratio_names = [k for k in ("ferry full / " + REFERENCE, *(f"ferry full / {v}" for v in PEERS.values()))
                       if any(k in c["ratios"] for c in p["cases"])]
        head = ["batch", "budget", *names, *[k.replace("ferry full / ", "full / ") for k in ratio_names]]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        notes: list[str] = []
        grouped = False
        for c in p["cases"]:
            cells = [str(c["batch"]), f"{100 * c['budget']:g}%"]
            for n in names:
                v = c["configs"].get(n)
                if v is None:
                    cells.append("")
                elif "unavailable" in v:
                    if v["unavailable"] not in notes:
                        notes.append(v["unavailable"])
                    cells.append(f"n/a ({notes.index(v['unavailable']) + 1})")
                elif n.startswith("ferry full, groups") and v.get("token_exact") is False:
                    # compared with the in-memory run at batch 16: another batch shape rounds bf16 differently
                    cells.append(_f(v["median"]) + " (tokens differ from batch 16 †)")
                    grouped = True
                else:
                    cells.append(_f(v["median"]) + ("" if v.get("token_exact", True) else " (not exact!)"))
            for k in ratio_names:
                r = c["ratios"].get(k)
                ok = r is not None and not math.isnan(r["median"])
                cells.append(f"**{r['median']:.2f}x**" + (f" ({r['min']:.2f}–{r['max']:.2f})" if len(r["runs"]) > 1
                                                          else "") if ok else "–")
            rows.append("| " + " | ".join(cells) + " |")
        mem = p["memory_limit"]
        intro = (f"**{label}: {p['model_name']}** ({p['expert_bytes'] / 2**20:.0f} MiB of experts + "
                 f"{p['nonexpert_bytes'] / 2**20:.0f} MiB of other weights in {rec['config']['dtype']}; decode tok/s, "
                 f"{p['new_tokens']} tokens after 16-token prompts; memory limit: {mem})")
        if grouped:
            notes.append("† groups of 8 decode in batches of 8, whose bf16 rounding differs from batch 16's; the "
                         "in-memory run with --max-num-seqs 8 gives the same tokens as the offloaded one")
        out.append(intro + "\n\n" + "\n".join(rows) + ("\n\n" + "; ".join(
            (f"({i + 1}) {n}" if not n.startswith("†") else n) for i, n in enumerate(notes)) if notes else ""))
        # ferry full's counters (and the disk bytes every engine read)
        head = ["batch", "budget", "hit rate", "prefetch precision", "prefetch recall", "expert MiB read/token",
                "I/O stall ms/token", *[f"disk MiB/token: {n}" for n in names if n != REFERENCE]]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in p["cases"]:
            f = c["configs"].get("ferry full", {})
            if "median" not in f:
                continue
            disk = [c["configs"].get(n, {}).get("disk_bytes_per_token") for n in names if n != REFERENCE]
            rows.append("| " + " | ".join([str(c["batch"]), f"{100 * c['budget']:g}%", _f(f.get("hit_rate"), True),
                                           _f(f.get("prefetch_precision"), True), _f(f.get("prefetch_recall"), True),
                                           _f((f.get("expert_bytes_per_token") or 0) / 2**20),
                                           _f(f.get("stall_ms_per_token")),
                                           *[_f(d / 2**20) if d is not None else "–" for d in disk]]) + " |")
        out.append(f"ferry full on {p['model_name']}: expert cache and I/O per generated token\n\n" + "\n".join(rows))
    cmd = " ".join(["python -m bench moe-offload", *rec["machine"]["argv"][rec["machine"]["argv"].index("moe-offload") + 1:]]
                   ) if "moe-offload" in rec["machine"]["argv"] else "python -m bench moe-offload"
    out.append(f"{rec['config']['threads']} threads for every engine; median of {rec['config']['runs']} round(s), "
               f"configurations alternating; git {rec['machine']['git']}, torch {rec['machine']['torch']}, "
               f"transformers {rec['machine']['transformers']}; {rec.get('duration_s', 0) / 60:.0f} min. "
               f"Reproduce: `{cmd}` (results in `bench/results/{rec['config'].get('out') or 'moe_offload'}.{{json,png}}`).")
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench moe-offload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="an OLMoE/Mixtral/Qwen-MoE folder instead of the random one ('none': only --trained)")
    ap.add_argument("--trained", default=str(TRAINED), help="trained MoE for routing metrics ('none': skip)")
    ap.add_argument("--engines", default="ferry,transformers,llama.cpp")
    ap.add_argument("--budgets", default=None, help="fractions of the experts' bytes in RAM (1,0.5,0.25,0.125)")
    ap.add_argument("--batches", default=None, help="sequences decoded together (1,16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per sequence (24)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="threads of every engine (2)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--klotski", type=int, default=8,
                    help="at budgets <= 25%% also decode the batch of 16 as sequential groups of this many (0: off)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per call of a ferry worker")
    ap.add_argument("--peer-timeout", type=float, default=120.0,
                    help="seconds per call of a peer (one that thrashes at its memory limit is n/a past it)")
    ap.add_argument("--no-parity", action="store_true", help="skip the float32 check of the engines")
    ap.add_argument("--no-limit", action="store_true", help="no cgroup memory limits (ferry's budget still holds)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 thread, 4 tokens: checks the code")
    ap.add_argument("--out", default=None, help="result name (default moe_offload)")
    args = ap.parse_args(argv)
    # --smoke shrinks only what the command line left unset
    sizes = dict(threads=1, new_tokens=4, batches="1,4", budgets="1,0.25") if args.smoke else \
        dict(threads=2, new_tokens=24, batches="1,16", budgets="1,0.5,0.25,0.125")
    for k, v in sizes.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.smoke and args.klotski == 8:
        args.klotski = 2
    engines = args.engines.split(",")
    started = time.perf_counter()
    record = new_record("moe-offload", QUESTION, args)
    record["models"] = {}
    WORK.mkdir(parents=True, exist_ok=True)
    if args.model != "none":
        model = Path(args.model) if args.model else random_model(args.smoke)
        run_model("random" if not args.model else "model", model, args, engines, False, record)
    if args.trained != "none":
        run_model("trained", Path(args.trained), args, ["ferry"], True, record)
    record["duration_s"] = time.perf_counter() - started
    path = result_path((args.out or "moe_offload"), args.smoke)
    path.write_text(json.dumps(record, indent=1, default=str))
    plot(record, path.with_suffix(".png"))
    print(f"[moe-offload] saved {path} (+ .png) after {record['duration_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()

"""Scenario moe-offload: decode throughput of a MoE whose experts live on disk, against the RAM budget for them.

Question: with only 100/50/25/12.5% of the experts' bytes allowed in RAM, how much of the all-in-memory decode
speed is left, at batch 1 and 16, for ferry's (a) on-demand loading, (b) LRU + pre-gating prefetch, (c) full
setting (correlation-aware eviction + pre-gating prefetch, planner-sized), (d) auto, the default (the setting
chosen online per batch size from measured time per token, ferry/experts/auto.py; its exploration is inside the
timed runs but for the first, which a warm-up of AUTO_WARMUP tokens at each batch size holds; "auto / best fixed"
pairs it round by round with the one of (a)-(c) with the best median), and for what a user would try
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
    the same safetensors). Greedy float32 parity of the three before timing (bench/parity.py).
  - trained: ferry/assets/ferry-tiny-moe (Mixtral, 8 experts top-2, experts ~3 MB) on held-out text, for what
    random routing cannot show: prefetch precision / recall and hit rate with realistic routing. ferry only.
Every ferry offload run must give the same greedy tokens as ferry with every expert in memory (`token_exact`).

Lossy rows, beside them (--no-int4 to skip): the int4 expert store (`ferry convert --expert-bits 4`, run through
ferry's int4 kernel, ferry/ops/qgemv.cpp) all in RAM ("ferry int4 in-memory (lossy)"), and under each budget's RAM
(budget x the lossless store's bytes, same memory limit) with ferry full's settings ("ferry int4 full (lossy)");
the int4 offload run must give the int4 in-memory run's tokens. "ferry auto-bits full (lossy)": an `--expert-bits
auto` store of the int4 store's bytes (each expert's format chosen from its inputs recorded on the eval's held-out
text: the same bytes spent where they lose least), under each budget's RAM with ferry full's settings. Their ratios
to the lossless all-in-memory run are reported next to the lossless ones, with the share of sequences that keep
the lossless tokens; perplexity is `ferry eval`'s business, not this scenario's.
Decode tok/s = B x (N - 1) / (time of N tokens - time of 1 token), prompts of 16 tokens, after a warm-up (ferry:
the median of 3 one-token runs; N = 24 on the random model, 64 on the trained one, whose steps take 2-10 ms); the
counters per token (hit rate, bytes read, stall) are over the N-token run.

    python -m bench moe-offload                    # ~15 min on 2 idle cores (first run: builds, converts, exports)
    python -m bench moe-offload --smoke            # tiny model, 1 thread, seconds
    python -m bench moe-offload --engines ferry --budgets 0.25 --batches 16 --no-parity --trained none

Writes bench/results/moe_offload.json (+ .png: throughput against budget) and fills docs/moe-offload.md's
`<!-- BENCH:moe-offload -->` block through `python -m bench report`. Modules: moe_setup.py (models, stores,
prompts), moe_configs.py (engine settings, memory limits, one measurement), moe_report.py (ratios, plot, table);
this one runs them."""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

from bench import memlimit
from bench.common import new_record, result_path, summary
from bench.moe_configs import (
    AUTO_BITS,
    INT4_REFERENCE,
    REFERENCE,
    SLACK,
    Config,
    Sizes,
    _Failed,
    configs_for,
    grouped,
    measure,
    reference_configs,
    reference_of,
    runtime_bytes,
)
from bench.moe_report import add_bound, add_ratios, plot
from bench.moe_setup import (
    TRAINED,
    WORK,
    background_reads,
    disk_bandwidth,
    expert_store,
    prompts_random,
    prompts_text,
    random_model,
    weight_bytes,
)

QUESTION = ("decode tok/s of a MoE with experts on disk and a RAM budget for them, ferry's modes against "
            "accelerate disk offload and llama.cpp mmap under the same memory limit")
AUTO = "ferry auto"
# decode steps of ferry auto's warm-up at each batch size: its first exploration (at most 4 settings x 2 rounds x
# (4 measured + 1 settling) steps) ends there, as it would in a server's first minute; the timed runs see what it
# settled on, and any later exploration (the first at 256 steps)
AUTO_WARMUP = 48
METRICS = ("lookups_per_step", "num_slots", "hit_rate", "prefetch_precision", "prefetch_recall",
           "expert_bytes_per_token", "stall_ms_per_token", "disk_bytes_per_token", "offload_switches")


def sizes_of(model: Path, args, engines: list[str]) -> tuple[Sizes, dict, list[Path]]:
    """The model's sizes and stores, its config, and the files evicted from the page cache before each start."""
    from bench.engines import GGUF_TYPES
    from ferry.experts.layout import StoreIndex
    store = expert_store(model, args.dtype)
    int4_store = None if args.no_int4 or "ferry" not in engines else expert_store(model, args.dtype, "4")
    auto_store = expert_store(model, args.dtype, "auto", StoreIndex.load(int4_store).total_nbytes) \
        if int4_store else None
    nonexpert, experts = weight_bytes(model, 4 if args.dtype == "float32" else 2)
    cfg = json.loads((model / "config.json").read_text())
    embeddings = cfg["vocab_size"] * cfg["hidden_size"] * (4 if args.dtype == "float32" else 2)
    embeddings *= 1 if cfg.get("tie_word_embeddings") else 2
    layer_bytes = (nonexpert - embeddings + experts) // cfg["num_hidden_layers"]  # one decoder layer's weights
    files = [model, store] + [s for s in (int4_store, auto_store) if s]
    if "llama.cpp" in engines:
        from bench.peers.gguf_export import ensure
        try:
            files.append(ensure(model, GGUF_TYPES[args.dtype]))
        except NotImplementedError:
            pass  # the llama.cpp config says why when it starts
    limits = not args.no_limit and memlimit.available() is None
    runtime = {e: runtime_bytes(e) for e in engines} if limits else {}
    sz = Sizes(nonexpert, experts, layer_bytes, store, StoreIndex.load(store).total_nbytes, int4_store, auto_store,
               runtime, limits)
    return sz, cfg, files


def run_model(label: str, model: Path, args, engines: list[str], text_prompts: bool, record: dict,
              runs: int, new_tokens: int) -> dict:
    """Every budget x config x batch on one model, `runs` rounds of `new_tokens` tokens per sequence; returns the
    model's part of the record."""
    t0 = time.perf_counter()
    budgets = [float(b) for b in args.budgets.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    sz, cfg, files = sizes_of(model, args, engines)
    part = {"model": str(model), "model_name": model.name, "model_config": cfg, "nonexpert_bytes": sz.nonexpert,
            "expert_bytes": sz.experts, "store_bytes": sz.store_bytes, "runtime_bytes": sz.runtime,
            "slack_bytes": SLACK, "int4_store": str(sz.int4_store) if sz.int4_store else None,
            "memory_limit": "cgroup" if sz.limits else f"none ({args.no_limit and '--no-limit' or memlimit.available()})",
            "budgets": budgets, "batches": batches, "new_tokens": new_tokens, "runs": runs, "cases": [],
            "plans": {}}
    if sz.int4_store:
        from ferry.experts.layout import StoreIndex
        part["int4_store_bytes"] = StoreIndex.load(sz.int4_store).total_nbytes
    if sz.auto_store:
        part["auto_store"] = str(sz.auto_store)
        part["auto_store_bytes"] = StoreIndex.load(sz.auto_store).total_nbytes
    record["models"][label] = part
    if "ferry" in engines:
        part["disk"] = disk_bandwidth(sz.store)
        print(f"[moe-offload] {label}: the store reads at {part['disk']['bytes_per_s'] / 1e9:.2f} GB/s", flush=True)
    if not args.no_parity and len(engines) > 1:
        from bench.parity import check, describe
        r = check(model, engines, args.threads)
        part["parity_float32"] = r
        print(f"[moe-offload] {label}: float32 parity: {describe(r)}", flush=True)
        if not r["ok"]:
            raise SystemExit("[moe-offload] engines disagree with ferry at float32; not timing (see the JSON)")
    prompts = lambda seed: {B: (prompts_text(model, B, seed) if text_prompts else
                                prompts_random(cfg["vocab_size"], B, seed)) for B in batches}
    prompt_sets, warm = prompts(0), prompts(1)
    grouping = args.klotski if min(budgets) <= 0.25 and 0 < args.klotski < max(batches) else None
    with ExitStack() as outer:
        refs = reference_configs(engines, sz, grouping)  # every expert in memory: speed and tokens, kept for all budgets
        for ref in refs:
            ref.start(outer, model, args.dtype, args.threads, args.timeout, files)
            if ref.worker:
                ref.call("generate", args.timeout, prompts=warm[max(batches)], max_tokens=[2] * max(batches))
        ref = next((r for r in refs if r.name == REFERENCE and r.worker), None)
        if ref is not None:
            part["interference"] = interference(ref, prompt_sets, args, sz.store, new_tokens)
            print(f"[moe-offload] {label}: reading the disk at full speed beside it slows in-memory decode by "
                  f"{ {B: f'{100 * v:.0f}%' for B, v in part['interference']['slowdown'].items()} }", flush=True)
        ref_ids: dict[tuple[str, int], list] = {}
        for budget in budgets:
            confs = configs_for(budget, engines, sz, grouping if budget <= 0.25 else None, WORK)
            with ExitStack() as stack:
                start_all(confs, stack, model, args, files, label, budget, part, warm)
                order = [r for r in refs if r.worker] + confs
                measured = measure_all(order, batches, prompt_sets, args, runs, new_tokens)
                for B in batches:
                    case = {"budget": budget, "batch": B, "configs": {}}
                    for c in order:
                        if grouped(c.name) and B < max(batches):
                            continue
                        s = summarize(c, measured.get((c.name, B), []), ref_ids, B)
                        case["configs"][c.name] = s
                    add_ratios(case)
                    add_bound(case, part)
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


def interference(ref: Config, prompt_sets: dict, args, store: Path, new_tokens: int, rounds: int = 5) -> dict:
    """How much the disk reading at full speed (another process, background_reads) slows ferry's all-in-memory
    decode, per batch: the overlap of reads and compute an offloading engine counts on is not free on every
    machine (on a virtual disk the host's I/O work can take the guest's CPU time). Runs alternate, quiet first."""
    slowdown = {}
    for B, prompts in prompt_sets.items():
        quiet, busy = [], []
        for _ in range(rounds):
            quiet.append(measure(ref, prompts, new_tokens, args.timeout)["seconds"])
            with background_reads(store):
                busy.append(measure(ref, prompts, new_tokens, args.timeout)["seconds"])
        slowdown[B] = max(0.0, statistics.median(busy) / statistics.median(quiet) - 1)
    return {"slowdown": slowdown, "rounds": rounds}


def start_all(confs: list[Config], stack: ExitStack, model: Path, args, files: list[Path], label: str, budget: float,
              part: dict, warm: dict[int, list[list[int]]]) -> None:
    """Start every configuration's worker under its limit, ask ferry full for its plan, warm each up (ferry auto:
    long enough at each batch size for its first exploration, AUTO_WARMUP tokens)."""
    for c in confs:
        c.start(stack, model, args.dtype, args.threads, args.timeout, files)
        if c.worker is None:
            print(f"[moe-offload] {label} budget {budget:g} {c.name}: n/a ({c.why})", flush=True)
            continue
        try:
            if c.name == "ferry full" and budget < 1:
                part["plans"][f"{budget:g}"] = c.call("expert_plan", args.timeout, max_num_seqs=16)
            if c.engine == "transformers":
                c.info["placement"] = c.call("placement", args.timeout)["counts"]
            c.call("generate", timeout_of(c, args), prompts=warm[max(warm)], max_tokens=[2] * max(warm))
            if c.name == AUTO:
                for prompts in warm.values():
                    c.call("generate", timeout_of(c, args), prompts=prompts, max_tokens=[AUTO_WARMUP] * len(prompts))
        except _Failed:
            print(f"[moe-offload] {label} budget {budget:g} {c.name}: n/a ({c.why})", flush=True)


def timeout_of(c: Config, args) -> float:
    return args.timeout if c.engine == "ferry" else args.peer_timeout


def measure_all(order: list[Config], batches: list[int], prompt_sets: dict, args, rounds: int,
                new_tokens: int) -> dict[tuple[str, int], list[dict]]:
    """`rounds` rounds over the configurations (the first one rotating), each batch size in turn."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(rounds):
        for c in order[r % len(order):] + order[:r % len(order)]:
            for B in batches:
                if c.worker is None or c.why or (grouped(c.name) and B < max(batches)):
                    continue
                try:
                    m = measure(c, prompt_sets[B], new_tokens, timeout_of(c, args))
                except _Failed:
                    continue
                m["round"] = r
                runs.setdefault((c.name, B), []).append(m)
    return runs


def summarize(c: Config, ms: list[dict], ref_ids: dict[tuple[str, int], list], B: int) -> dict:
    """One configuration at one batch: tok/s summary, median counters, token exactness against its reference."""
    if not ms:
        return {"unavailable": c.why or "not run"}
    ids = [m.pop("token_ids", None) for m in ms]
    if reference_of(c.name) == c.name:
        ref_ids[(c.name, B)] = ids[0]
    s = summary([m["tok_s"] for m in ms])
    s["measurements"] = ms
    for key in METRICS:
        vals = [m[key] for m in ms if m.get(key) is not None]
        if vals:
            s[key] = sorted(vals)[len(vals) // 2]
    if c.name == AUTO:  # what it ran at the end of each round (it chooses per batch size)
        s["offload_settings"] = [m.get("offload_setting") for m in ms]
    want = ref_ids.get((reference_of(c.name), B))
    if c.engine == "ferry" and c.name != reference_of(c.name) and ids[0] is not None and want is not None:
        s["token_exact"] = all(i == want for i in ids)
    lossless = ref_ids.get((REFERENCE, B))
    if reference_of(c.name) in (INT4_REFERENCE, AUTO_BITS) and ids[0] is not None and lossless is not None:  # lossy
        s["sequences_as_lossless"] = sum(a == b for a, b in zip(ids[0], lossless)) / len(lossless)
    if c.cgroup is not None:
        s.update(limit_bytes=c.limit, peak_bytes=c.cgroup.peak_bytes, limit_hits=c.cgroup.failcnt)
    s.update({k: v for k, v in c.info.items() if k != "load_s"})
    return s


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
    ap.add_argument("--trained-new-tokens", type=int, default=None,
                    help="tokens per sequence on the trained model (64: its steps take 2-10 ms, so 24 tokens timed "
                         "a few ms of decode and its in-memory row read 557-1614 tok/s across budgets)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="threads of every engine (2)")
    ap.add_argument("--runs", type=int, default=1, help="rounds on the random model (its peers take minutes)")
    ap.add_argument("--trained-runs", type=int, default=None,
                    help="rounds on the trained model (5; it decodes in seconds)")
    ap.add_argument("--klotski", type=int, default=8,
                    help="at budgets <= 25%% also decode the batch of 16 as sequential groups of this many (0: off)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per call of a ferry worker")
    ap.add_argument("--peer-timeout", type=float, default=120.0,
                    help="seconds per call of a peer (one that thrashes at its memory limit is n/a past it)")
    ap.add_argument("--no-parity", action="store_true", help="skip the float32 check of the engines")
    ap.add_argument("--no-limit", action="store_true", help="no cgroup memory limits (ferry's budget still holds)")
    ap.add_argument("--no-int4", action="store_true", help="skip the lossy int4 rows")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 thread, 4 tokens: checks the code")
    ap.add_argument("--out", default=None, help="result name (default moe_offload)")
    args = ap.parse_args(argv)
    # --smoke shrinks only what the command line left unset
    sizes = dict(threads=1, new_tokens=4, trained_new_tokens=4, batches="1,4", budgets="1,0.25", trained_runs=1) \
        if args.smoke else dict(threads=2, new_tokens=24, trained_new_tokens=64, batches="1,16",
                                budgets="1,0.5,0.25,0.125", trained_runs=5)
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
        run_model("random" if not args.model else "model", model, args, engines, False, record, args.runs,
                  args.new_tokens)
    if args.trained != "none":
        run_model("trained", Path(args.trained), args, ["ferry"], True, record, args.trained_runs,
                  args.trained_new_tokens)
    record["duration_s"] = time.perf_counter() - started
    path = result_path((args.out or "moe_offload"), args.smoke)
    path.write_text(json.dumps(record, indent=1, default=str))
    plot(record, path.with_suffix(".png"))
    print(f"[moe-offload] saved {path} (+ .png) after {record['duration_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()

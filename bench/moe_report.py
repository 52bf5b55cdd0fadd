"""bench moe-offload: ratios, the plot and the README block (see bench/moe_offload.py)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from bench.common import summary
from bench.moe_configs import (AUTO_BITS, FIXED_MODES, GROUPS, INT4_FULL, INT4_REFERENCE, PEERS, REFERENCE, column_rank,
                               grouped, reference_of)

BEST_FIXED = "best fixed"  # the fixed setting (FIXED_MODES) with the best median tok/s in the case (add_ratios)
# (numerator, denominator, column label): per-round ratios summarized into each case
RATIOS = [("ferry auto", REFERENCE, "auto / ferry in-memory"), ("ferry auto", BEST_FIXED, "auto / best fixed"),
          ("ferry auto", "ferry on-demand", "auto / on-demand"),
          ("ferry full", REFERENCE, "full / ferry in-memory"),
          *[("ferry full", v, f"full / {v}") for v in PEERS.values()],
          ("ferry full", "ferry on-demand", "full / on-demand"), ("ferry full", "ferry lru+prefetch", "full / lru+prefetch"),
          (INT4_FULL, REFERENCE, "int4 full / ferry in-memory (lossy)"),
          (INT4_REFERENCE, REFERENCE, "int4 in-memory / ferry in-memory (lossy)"),
          (AUTO_BITS, REFERENCE, "auto-bits full / ferry in-memory (lossy)")]
SHOWN = {"auto / ferry in-memory", "auto / best fixed", "full / ferry in-memory",
         *(f"full / {v}" for v in PEERS.values()), "int4 full / ferry in-memory (lossy)",
         "int4 in-memory / ferry in-memory (lossy)", "auto-bits full / ferry in-memory (lossy)"}  # README ratios


def add_ratios(case: dict) -> None:
    """Per round: ferry auto and full (and int4) / all in memory, auto / the best fixed setting, ferry full / each
    peer; summaries of them.

    The best fixed setting is the one of FIXED_MODES with the highest median tok/s in this case (case["best_fixed"]),
    and auto is paired with it round by round. Not the fastest of them in each round: when the fixed settings are
    equally fast, the largest of three noisy numbers is one noise sigma above their common speed, so that yardstick
    put auto ~0.9x below a setting it ties with (the trained MoE at 100%, where auto runs the same code as on-demand)."""
    by_round = {n: {m["round"]: m["tok_s"] for m in v.get("measurements", [])} for n, v in case["configs"].items()}
    fixed = [n for n in FIXED_MODES if by_round.get(n)]
    if fixed:
        best = max(fixed, key=lambda n: statistics.median(by_round[n].values()))
        case["best_fixed"] = best
        by_round[BEST_FIXED] = by_round[best]
    ratios = {}
    for num, den, label in RATIOS:
        a, b = by_round.get(num, {}), by_round.get(den, {})
        vals = [a[r] / b[r] for r in a if r in b and b[r] > 0]
        if vals:
            ratios[label] = summary(vals)
    case["ratios"] = ratios


def add_bound(case: dict, part: dict) -> None:
    """The most any lossless engine could reach at this budget and batch, as a share of all-in-memory speed.

    A decode step needs `lookups` distinct experts (ferry full's count: every lossless run routes the same) and
    starts with at most `slots` of them in RAM, so it reads at least lookups - slots records from the device:
    read time r = that many record bytes / the device's read rate. The rate is the faster of the store's measured
    rate (disk_bandwidth, before the runs) and the rate ferry full itself read at in this case (a virtual disk's
    speed varies with its host's caching). The step's compute c is the all-in-memory step, and while the disk
    reads, compute runs s times slower (s: the measured interference, when the model has it). At best every read
    overlaps compute: the step then takes c + r s / (1 + s) while the reads end first, else r; with s = 0 that is
    max(c, r). bound = c / that. Any eviction policy, prefetch or pipeline stays under it."""
    full, ref, disk = case["configs"].get("ferry full", {}), case["configs"].get(REFERENCE, {}), part.get("disk")
    if not disk or "lookups_per_step" not in full or "median" not in ref:
        return
    reads = max(0.0, full["lookups_per_step"] - full["num_slots"])
    rate = max(disk["bytes_per_s"], full.get("expert_bytes_per_token", 0.0) * full["median"])
    io_s = reads * disk["record_bytes"] / rate
    mem_s = case["batch"] / ref["median"]
    slowdown = part.get("interference", {}).get("slowdown", {})
    s = slowdown.get(case["batch"], slowdown.get(str(case["batch"]), 0.0))
    step_s = mem_s + io_s * s / (1 + s) if io_s <= mem_s * (1 + s) else io_s
    ratio = mem_s / step_s
    achieved = case["ratios"].get("full / ferry in-memory", {}).get("median")
    case["bound"] = {"read_bytes_per_s": rate, "min_reads_per_step": reads, "min_read_ms_per_step": 1e3 * io_s,
                     "in_memory_ms_per_step": 1e3 * mem_s, "interference": s, "ratio": ratio,
                     "full_share_of_bound": achieved / ratio if achieved is not None else None}


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
        out.append(_throughput_table(label, p, rec["config"]["dtype"]))
        out.append(_counters_table(p))
    cmd = " ".join(["python -m bench moe-offload", *rec["machine"]["argv"][rec["machine"]["argv"].index("moe-offload") + 1:]]
                   ) if "moe-offload" in rec["machine"]["argv"] else "python -m bench moe-offload"
    rounds = ", ".join(f"{p.get('runs', rec['config']['runs'])} on {label}" for label, p in rec["models"].items())
    out.append(f"{rec['config']['threads']} threads for every engine; median of rounds ({rounds}), "
               f"configurations alternating; git {rec['machine']['git']}, torch {rec['machine']['torch']}, "
               f"transformers {rec['machine']['transformers']}; {rec.get('duration_s', 0) / 60:.0f} min. "
               f"Reproduce: `{cmd}` (results in `bench/results/{rec['config'].get('out') or 'moe_offload'}.{{json,png}}`).")
    return "\n\n".join(out)


def _cell(n: str, v: dict | None, notes: list[str], configs: dict) -> str:
    if v is None:
        return ""
    if "unavailable" in v:
        if v["unavailable"] not in notes:
            notes.append(v["unavailable"])
        return f"n/a ({notes.index(v['unavailable']) + 1})"
    if grouped(n) and reference_of(n) not in configs:  # a record from before the grouped in-memory reference
        return _f(v["median"]) + " (tokens not checked †)"
    return _f(v["median"]) + ("" if v.get("token_exact", True) else " (not exact!)") + (" †" if grouped(n) else "")


def _throughput_table(label: str, p: dict, dtype: str) -> str:
    names = sorted(dict.fromkeys(n for c in p["cases"] for n in c["configs"]), key=column_rank)
    ratio_names = [k for _, _, k in RATIOS if k in SHOWN and any(k in c["ratios"] for c in p["cases"])]
    bound = any("bound" in c for c in p["cases"])
    head = ["batch", "budget", *names, *ratio_names, *(["lossless bound ‡"] if bound else [])]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: list[str] = []
    for c in p["cases"]:
        cells = [str(c["batch"]), f"{100 * c['budget']:g}%", *[_cell(n, c["configs"].get(n), notes, c["configs"]) for n in names]]
        for k in ratio_names:
            r = c["ratios"].get(k)
            ok = r is not None and not math.isnan(r["median"])
            cells.append(f"**{r['median']:.2f}x**" + (f" ({r['min']:.2f}–{r['max']:.2f})" if len(r["runs"]) > 1
                                                      else "") if ok else "–")
        if bound:
            cells.append(f"{c['bound']['ratio']:.2f}x" if "bound" in c else "–")
        rows.append("| " + " | ".join(cells) + " |")
    int4 = (f"; int4 store {p['int4_store_bytes'] / 2**20:.0f} MiB, its rows get the bf16 rows' RAM"
            if p.get("int4_store_bytes") else "")
    auto = ""
    if p.get("auto_store_bytes"):
        agree = [f"{c['configs'][AUTO_BITS]['sequences_as_lossless']:.0%}" for c in p["cases"]
                 if "sequences_as_lossless" in c["configs"].get(AUTO_BITS, {})]
        auto = (f"; auto-bits store (`--expert-bits auto`, the int4 store's size) {p['auto_store_bytes'] / 2**20:.0f}"
                f" MiB, sequences with the lossless tokens per offloaded case {' / '.join(agree) or 'n/a'}")
    intro = (f"**{label}: {p['model_name']}** ({p['expert_bytes'] / 2**20:.0f} MiB of experts + "
             f"{p['nonexpert_bytes'] / 2**20:.0f} MiB of other weights in {dtype}{int4}{auto}; decode tok/s, "
             f"{p['new_tokens']} tokens after 16-token prompts; memory limit: {p['memory_limit']})")
    if bound:
        slow = p.get("interference", {}).get("slowdown", {})
        slow = ", ".join(f"{100 * v:.0f}% at batch {B}" for B, v in slow.items())
        notes.append(f"‡ the most any lossless engine could reach, as a share of all-in-memory speed: a step reads at "
                     f"least (experts it needs − experts the budget holds) records, at the faster of the store's "
                     f"measured rate ({p['disk']['bytes_per_s'] / 1e9:.2f} GB/s) and the rate ferry full read at, "
                     f"every read overlapping compute"
                     + (f", which the disk reading at full speed slows by {slow} (measured)" if slow else "")
                     + " (bench/moe_report.py, add_bound)")
    if any(n.startswith(GROUPS) for n in names):
        notes.append("† groups of k: the batch decoded as sequential groups of k sequences (--max-num-seqs k), their "
                     "tokens are compared with the in-memory run of the same groups (batches of k round bf16 "
                     "differently from one batch) where the record has that run")
    return intro + "\n\n" + "\n".join(rows) + ("\n\n" + "; ".join(
        (f"({i + 1}) {n}" if n[0] not in "†‡" else n) for i, n in enumerate(notes)) if notes else "")


def _counters_table(p: dict) -> str:
    """ferry full's counters (and int4 full's), and the disk bytes every engine read."""
    names = sorted((n for n in dict.fromkeys(n for c in p["cases"] for n in c["configs"]) if "in-memory" not in n),
                   key=column_rank)
    int4 = any(INT4_FULL in c["configs"] for c in p["cases"])
    auto = any(c["configs"].get("ferry auto", {}).get("offload_settings") for c in p["cases"])
    head = ["batch", "budget", *(["auto ran (per round)"] if auto else []), "hit rate", "prefetch precision",
            "prefetch recall", "expert MiB read/token", "I/O stall ms/token",
            *(["int4: hit rate", "int4: expert MiB read/token", "int4: sequences with the lossless tokens"] if int4
              else []),
            *[f"disk MiB/token: {n}" for n in names]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in p["cases"]:
        f, q = c["configs"].get("ferry full", {}), c["configs"].get(INT4_FULL, {})
        if "median" not in f:
            continue
        disk = [c["configs"].get(n, {}).get("disk_bytes_per_token") for n in names]
        ran = ", ".join(x or "?" for x in c["configs"].get("ferry auto", {}).get("offload_settings", []))
        cells = [str(c["batch"]), f"{100 * c['budget']:g}%", *([ran or "–"] if auto else []),
                 _f(f.get("hit_rate"), True),
                 _f(f.get("prefetch_precision"), True), _f(f.get("prefetch_recall"), True),
                 _f((f.get("expert_bytes_per_token") or 0) / 2**20), _f(f.get("stall_ms_per_token"))]
        if int4:
            cells += [_f(q.get("hit_rate"), True),
                      _f(q["expert_bytes_per_token"] / 2**20) if q.get("expert_bytes_per_token") is not None else "–",
                      _f(q.get("sequences_as_lossless"), True)]
        rows.append("| " + " | ".join(cells + [_f(d / 2**20) if d is not None else "–" for d in disk]) + " |")
    return f"ferry full on {p['model_name']}: expert cache and I/O per generated token\n\n" + "\n".join(rows)

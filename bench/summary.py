"""The README's summary table: where ferry stands against its peers, one row per benchmark question.

Every cell is read from the default run of a scenario (bench/results/<scenario>.json; runs saved with --out
stay on the detail pages): ferry's ratio to each peer (the median of per-round ratios, as the detail tables
print it), whether the project's goal for that question is met by those numbers, and the run the row comes
from (commit, CPU, threads) with a link to the full table. `python -m bench report` regenerates it with the
detail pages, so the summary can never disagree with them.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

PEERS = ("llama.cpp", "transformers")


@dataclass(frozen=True)
class Goal:
    """ferry / peer must be at least `at_least` (or below `below`) in every case of the row's main dtype."""
    peer: str
    at_least: float | None = None
    below: float | None = None

    def text(self) -> str:
        return f"≥ {self.at_least:g}x {self.peer}" if self.at_least is not None else f"< {self.below:g}x {self.peer}"

    def met(self, ratios: list[float]) -> bool:
        if not ratios or any(math.isnan(r) for r in ratios):
            return False
        return all(r >= self.at_least if self.at_least is not None else r < self.below for r in ratios)


# scenario -> (question, goals); the goals are the project's targets for the dense engine (none for memory)
QUESTIONS: dict[str, tuple[str, tuple[Goal, ...]]] = {
    "throughput": ("offline throughput", (Goal("llama.cpp", at_least=1.5), Goal("transformers", at_least=4.0))),
    "decode": ("single-stream decode", (Goal("llama.cpp", at_least=1.0),)),
    "prefill": ("prefill", (Goal("llama.cpp", at_least=1.0),)),
    "serving": ("online serving, TTFT p99 (lower is better)", (Goal("llama.cpp", below=1.0),)),
    "memory": ("peak memory, same job (lower is better)", ()),
}
MOE_BUDGETS = (0.5, 0.25, 0.125)  # the budgets the MoE row shows, batch 16 on the random OLMoE-shaped model
MOE_PEERS = {"llama.cpp": "full / llama.cpp mmap", "transformers": "full / accelerate disk offload"}


def _x(r: float) -> str:
    return "n/a" if math.isnan(r) else f"{r:.2f}x"


def _common_affixes(labels: list[str]) -> str:
    """'prefill 512 tokens', 'prefill 2048 tokens' -> 'prefill 512 / 2048 tokens' (one label: itself)."""
    if len(labels) == 1:
        return labels[0]
    pre = os.path.commonprefix(labels)
    pre = pre[:pre.rfind(" ") + 1]
    suf = os.path.commonprefix([s[::-1] for s in labels])[::-1]
    suf = suf[suf.find(" "):] if " " in suf else ""
    middles = [s[len(pre):len(s) - len(suf)] for s in labels]
    return pre + " / ".join(middles) + suf


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _run(rec: dict, threads: int, link: str) -> str:
    m = rec["machine"]
    return f"`{m.get('git', '?')}`, {m.get('cpu', '?')}, {threads} threads ([table]({link}))"


def offline_row(scenario: str, rec: dict, link: str) -> list[str]:
    """throughput / decode / prefill / memory: the first dtype's cases joined, other dtypes in parentheses."""
    question, goals = QUESTIONS[scenario]
    dtypes = list(dict.fromkeys(c["dtype"] for c in rec["cases"]))
    main = [c for c in rec["cases"] if c["dtype"] == dtypes[0]]
    cells = []
    for p in PEERS:
        if p not in rec["engines"]:
            cells.append("—")
            continue
        cell = " / ".join(_x(c["ratios"].get(p, {"median": math.nan})["median"]) for c in main)
        for d in dtypes[1:]:
            other = [c for c in rec["cases"] if c["dtype"] == d]
            cell += f" ({d}: " + " / ".join(_x(c["ratios"].get(p, {"median": math.nan})["median"]) for c in other) + ")"
        cells.append(cell)
    status = [g.text() + (": met" if g.met([c["ratios"].get(g.peer, {"median": math.nan})["median"] for c in main])
                          else ": not yet") for g in goals]
    case = f"{_common_affixes([c['label'] for c in main])}, {dtypes[0]}"
    return [question, case, *cells, "; ".join(status) or "—", _run(rec, rec["config"]["threads"], link)]


def serving_row(rec: dict, link: str) -> list[str]:
    """TTFT p99 ratio ferry/llama-server at each arrival rate."""
    question, goals = QUESTIONS["serving"]
    key = next(k for k in next(iter(rec["summary"].values())) if k.startswith("ratio"))
    ratios = [s[key]["ttft_p99_s"]["median"] for s in rec["summary"].values()]
    rates = " / ".join(rec["summary"])
    status = [g.text() + (": met" if g.met(ratios) else ": not yet") + " at every rate" for g in goals]
    cells = [" / ".join(_x(r) for r in ratios), "—"]
    case = f"Poisson arrivals at {rates} req/s, {rec['config']['dtype']}"
    return [question, case, *cells, "; ".join(status), _run(rec, rec["config"]["threads"], link)]


def moe_row(rec: dict, link: str) -> list[str] | None:
    """MoE decode with experts on disk: ferry full against llama.cpp mmap and accelerate disk offload, on the
    first model the peers ran (the random OLMoE-shaped one; the trained MoE runs ferry alone). None: no peers."""
    p = next((m for m in rec["models"].values()
              if any(k in c["configs"] for c in m["cases"] for k in ("llama.cpp mmap", "accelerate disk offload"))), None)
    if p is None:
        return None
    cases = [c for c in p["cases"] if c["batch"] == max(p["batches"]) and c["budget"] in MOE_BUDGETS]
    cells = []
    for peer, key in MOE_PEERS.items():
        rs = [c["ratios"].get(key) for c in cases]
        if all(r is None for r in rs):  # the peer ran out of time at every budget: say why, from the record
            why = {c["configs"].get(key.removeprefix("full / "), {}).get("unavailable") for c in cases} - {None}
            cells.append("n/a" + (f" ({'; '.join(sorted(why))})" if why else ""))
        else:
            cells.append(" / ".join("n/a" if r is None else _x(r["median"]) for r in rs))
    budgets = " / ".join(f"{100 * b:g}%" for b in MOE_BUDGETS)
    case = (f"{p['model_name']}, batch {max(p['batches'])}, experts' RAM budget {budgets}; peers: llama.cpp mmap, "
            "transformers + accelerate disk offload, same cgroup memory limit")
    return ["MoE decode, experts on disk", case, *cells, "—", _run(rec, rec["config"]["threads"], link)]


def roofline_row(rec: dict, link: str) -> list[str]:
    """The roofline model's predicted / measured step time per case (no peer: the goal is within 25% everywhere)."""
    cases = rec["cases"]
    cell = " / ".join(f"{c['ratio']:.2f}" for c in cases)
    models = " and ".join(dict.fromkeys(c["model"] for c in cases))
    dtypes = ", ".join(dict.fromkeys(c["dtype"] for c in cases))
    batches = " / ".join(str(b) for b in dict.fromkeys(c["batch_size"] for c in cases))
    met = all(c["within_25pct"] for c in cases)
    case = f"predicted / measured step time: {models}, {dtypes}, prefill and decode at batch {batches}: {cell}"
    return ["roofline model", case, "—", "—", "within 25% in every case: " + ("met" if met else "not yet"),
            _run(rec, rec["hardware"]["threads"], link)]


def speculative_row(rec: dict, link: str) -> list[str]:
    """Per case, ferry's best speed-up from speculation against llama.cpp's best from its own, and issue 20's goals."""
    def best(case: dict, llama: bool) -> float:
        rs = [r["median"] for m, r in case["ratios"].items() if m.startswith("llama.cpp") == llama]
        return max(rs) if rs else math.nan
    cases = rec["cases"]
    cell = "; ".join(f"{c['workload']} at {c['concurrency']}: {_x(best(c, False))} vs {_x(best(c, True))}"
                     for c in cases)
    ferry = {(c["workload"], c["concurrency"]): c["ratios"] for c in cases}
    equal = all(e.get("equivalence") == 1.0 for c in cases for m, e in c["engines"].items()
                if not m.startswith("llama.cpp"))
    goals = [("gain ≥ llama.cpp's in every case", all(best(c, False) >= best(c, True) for c in cases)),
             ("≥ 0.97x at 16 on every workload", all(r["median"] >= 0.97 for c in cases if c["concurrency"] == 16
                                                     for m, r in c["ratios"].items() if not m.startswith("llama"))),
             ("n-gram or phrase ≥ 2x, grounded at 1", max((ferry.get(("grounded", 1), {}).get(m, {"median": 0.0})
                                                           ["median"] for m in ("ngram", "phrase")), default=0) >= 2),
             ("draft ≥ 1.3x, open at 1", ferry.get(("open", 1), {}).get("draft", {"median": 0.0})["median"] >= 1.3),
             ("greedy output identical", equal)]
    return ["speculative decoding: ferry's speed-up over no speculation vs llama.cpp's over none",
            f"ferry-tiny + ferry-tiny-draft, {rec['config']['dtype']}, workload at concurrency: {cell}", "see case",
            "—", "; ".join(f"{g}: {'met' if ok else 'not yet'}" for g, ok in goals),
            _run(rec, rec["config"]["threads"], link)]


QUANT_GOALS = {"decode": 1.0, "prefill": 1.0, "requests": 1.5}  # per kind of case: ferry / llama.cpp (issue 19)


def _quant_kind(case: dict) -> str:
    return next((k for k in ("decode", "prefill") if case["label"].startswith(k)), "requests")


def quantization_row(rec: dict, link: str) -> list[str]:
    """Per precision: ferry / llama.cpp for each case in order (e.g. "int4: 1.10x / 1.20x, 1.30x / 1.70x" for
    decode batch 1 / prefill at each length / the 32-request job)."""
    precisions = list(dict.fromkeys(c["dtype"] for c in rec["cases"]))
    ratios: dict[tuple[str, str], list[float]] = {}
    for c in rec["cases"]:
        ratios.setdefault((c["dtype"], _quant_kind(c)), []).append(
            c["ratios"].get("llama.cpp", {"median": math.nan})["median"])
    kinds = [k for k in QUANT_GOALS if any(kind == k for _, kind in ratios)]
    cell = "; ".join(f"{p}: " + " / ".join(", ".join(map(_x, ratios.get((p, k), [math.nan]))) for k in kinds)
                     for p in precisions)
    met = all(Goal("llama.cpp", at_least=QUANT_GOALS[k]).met([r for p in precisions for r in ratios.get((p, k), [math.nan])])
              for k in kinds)
    lengths = ", ".join(str(c["prompt_len"]) for c in rec["cases"] if c["dtype"] == precisions[0] and _quant_kind(c) == "prefill")
    shown = {"decode": "decode batch 1", "prefill": f"prefill {lengths}", "requests": "32 requests"}
    goal = ", ".join(f"{'32 requests' if k == 'requests' else k} ≥ {QUANT_GOALS[k]:g}x" for k in kinds) + " llama.cpp at every precision"
    return ["weight-only int8 / int4 (and float32 / bf16) against llama.cpp Q8_0 / Q4_0 (F32 / BF16)",
            " / ".join(shown[k] for k in kinds) + ", per precision", cell, "—", goal + (": met" if met else ": not yet"),
            _run(rec, rec["config"]["threads"], link)]


def table(results: Path, links: dict[str, str]) -> str:
    """The summary block, or a line saying how to produce it when no result file exists yet."""
    head = ["question", "case", *[f"ferry / {p}" for p in PEERS], "goal", "run"]
    rows = []
    for scenario in QUESTIONS:
        f = results / f"{scenario}.json"
        if f.is_file():
            rec = json.loads(f.read_text())
            rows.append(serving_row(rec, links[scenario]) if scenario == "serving"
                        else offline_row(scenario, rec, links[scenario]))
    if (results / "quantization.json").is_file():
        rows.append(quantization_row(json.loads((results / "quantization.json").read_text()), links["quantization"]))
    if (results / "moe_offload.json").is_file():
        row = moe_row(json.loads((results / "moe_offload.json").read_text()), links["moe-offload"])
        rows += [row] if row else []
    if (results / "speculative.json").is_file():
        rows.append(speculative_row(json.loads((results / "speculative.json").read_text()), links["speculative"]))
    if (results / "roofline.json").is_file():
        rows.append(roofline_row(json.loads((results / "roofline.json").read_text()), links["roofline"]))
    if not rows:
        return "Not measured yet: `make bench`, then `python -m bench report`."
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]
    return ("\n".join(lines) + "\n\nRatios are ferry's number over the peer's (tok/s: above 1 is faster; latency "
            "and memory: below 1 is better), medians of per-round ratios, same weights, prompts and thread count, "
            "after a float32 check that the engines agree on greedy tokens.")

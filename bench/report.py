"""Regenerate the benchmark tables in the README and the docs pages from bench/results/*.json.

Each block fills its own markers, `<!-- BENCH:<name> -->` ... `<!-- /BENCH:<name> -->`, in the page PAGE_OF names:
the README holds the summary (bench/summary.py: one row per question, ferry's ratio to each peer, the run it
comes from); docs/benchmarks.md holds one table per result file of the dense scenarios (bench/results/<scenario>.json,
then any <scenario>-<name>.json saved with --out) with every engine's median and ferry's ratio to each peer (median
of the per-round ratios, min–max), a note on the run (model, threads, parity, bandwidth) and the command that
reproduces it; docs/moe-offload.md, docs/long-context.md, docs/roofline.md, docs/speculative.md (speculative,
verify-cost, route) and docs/cluster.md (cluster, fairness) hold their scenarios' tables (SECTIONS: each rendered by
its scenario's module). Where an engine could not
run a case the cell says n/a with a numbered reason under the table. Links are written relative to each page.

    python -m bench report            # or: ferry bench report
    python -m bench report --results bench/.cache/smoke --into bench/.cache/smoke   # e.g. render smoke results
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
from pathlib import Path

from bench.summary import anchor

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TITLES = {"throughput": "Offline throughput", "decode": "Single-stream decode", "prefill": "Prefill",
          "serving": "Online serving against llama.cpp's server", "memory": "Peak memory for the same job"}
SCENARIOS = tuple(TITLES)
QUANT_TITLE = "Weight-only quantization against llama.cpp"
# block -> the page (relative to the repo root) whose markers it fills; declared once, used to fill and to link
# scenarios whose module renders its own block: block -> (results file stem, module with section(record))
SECTIONS = {"long-context": ("long_context", "bench.long_context"), "roofline": ("roofline", "bench.roofline"),
            "speculative": ("speculative", "bench.speculative"), "verify-cost": ("verify_cost", "bench.verify_cost"),
            "route": ("route", "bench.route"), "cluster": ("cluster", "bench.cluster"),
            "fairness": ("fairness", "bench.fairness_report")}
PAGE_OF = {"summary": "README.md", **{s: "docs/benchmarks.md" for s in SCENARIOS}, "quantization": "docs/benchmarks.md",
           "moe-offload": "docs/moe-offload.md", "long-context": "docs/long-context.md", "roofline": "docs/roofline.md",
           "speculative": "docs/speculative.md", "verify-cost": "docs/speculative.md", "route": "docs/speculative.md",
           "cluster": "docs/cluster.md", "fairness": "docs/cluster.md"}
PAGES = tuple(dict.fromkeys(PAGE_OF.values()))


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def command(rec: dict) -> str:
    """The command line that produced rec, as `python -m bench SCENARIO ...` (from the recorded argv)."""
    argv = rec["machine"].get("argv", [])
    at = next((i for i, a in enumerate(argv) if a in (rec["scenario"], "all")), None)  # `all` runs every scenario
    rest = argv[at + 1:] if at is not None else []
    return " ".join(["python -m bench", rec["scenario"], *rest])


def offline_table(rec: dict) -> str:
    """decode / prefill / throughput / memory: a row per case, a column per engine, then ferry/peer ratios."""
    engines = rec["engines"]
    peers = [e for e in engines if e != "ferry"] if "ferry" in engines else []
    head = ["case", "dtype", *engines, *[f"ferry / {p}" for p in peers]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reasons: list[str] = []

    def na(reason: str) -> str:
        if reason not in reasons:
            reasons.append(reason)
        return f"n/a ({reasons.index(reason) + 1})"

    for c in rec["cases"]:
        cells = [c["label"], c["dtype"]]
        for e in engines:
            s = c["engines"].get(e, {"unavailable": "not run"})
            cells.append(na(s["unavailable"]) if "unavailable" in s else _fmt(s["median"]))
        for p in peers:
            r = c["ratios"].get(p)
            cells.append(f"**{r['median']:.2f}x** ({r['min']:.2f}–{r['max']:.2f})" if r and not math.isnan(r["median"])
                         else "n/a")
        rows.append("| " + " | ".join(cells) + " |")
    better = {c["metric"]: c["higher_is_better"] for c in rec["cases"]}
    units = "; ".join(f"{m}, {'higher' if hb else 'lower'} is better (a ratio above 1 means ferry "
                      f"{'is faster' if hb else 'uses more'})" for m, hb in better.items())
    notes = [f"({i + 1}) {r}" for i, r in enumerate(reasons)]
    return "\n".join(rows) + ("\n\n" + "; ".join(notes) if notes else "") + f"\n\nUnits: {units}."


def offline_note(rec: dict) -> str:
    from bench.parity import describe
    cfg = rec["config"]
    threads = cfg["threads"]
    parts = [f"{rec['model_name']} (random weights)", f"{threads} thread{'s' * (threads != 1)} for every engine",
             f"median of {cfg['runs']} runs after a warm-up, engines alternating"]
    if "parity_float32" in rec:
        parts.append(f"float32 check against ferry before timing: {describe(rec['parity_float32'])}")
    if "bandwidth_gbs_before" in rec:
        parts.append(f"memory bandwidth {rec['bandwidth_gbs_before']:.0f} GB/s before the run, "
                     f"{rec.get('bandwidth_gbs_after', 0):.0f} after")
    peers = rec.get("peers", {})
    if peers:
        parts.append(f"llama-cpp-python {peers.get('llama_cpp_python')}")
    parts.append(f"transformers {rec['machine']['transformers']}, torch {rec['machine']['torch']}")
    return "; ".join(parts) + "."


def offline_section(rec: dict, scenario: str) -> str:
    extra = ""
    if scenario == "decode":
        gbs = [f"{c['dtype']}: " + ", ".join(f"{e} {v:.1f}" for e, v in c.get("weight_gbs", {}).items())
               for c in rec["cases"] if c.get("weight_gbs")]
        if gbs:
            extra = f"\n\nWeight bytes streamed per second, GB/s ({'; '.join(gbs)})."
    threads = rec["config"]["threads"]
    return (f"### {TITLES[scenario]} ({rec['model_name']}, {threads} thread{'s' * (threads != 1)})\n\n"
            f"{offline_table(rec)}{extra}\n\n{offline_note(rec)}\n\nReproduce: `{command(rec)}` "
            f"(results in `bench/results/{scenario}.{{json,png}}`).\n\n![](bench/results/{scenario}.png)")


def serving_section(rec: dict) -> str:
    from bench.serving import markdown
    c = rec["config"]
    lo_in, _, hi_in = c["input_len"].partition(":")
    lo_out, _, hi_out = c["output_len"].partition(":")
    text = (f"Poisson arrivals at each rate ({c['num_requests']} requests per point, prompts of {lo_in}–{hi_in} "
            f"random token ids, {lo_out}–{hi_out} output tokens, streamed, temperature 0, end-of-sequence "
            "disabled), ferry's server against llama.cpp's `llama-server` (built from the llama.cpp sources "
            "bundled with llama-cpp-python, `GGML_NATIVE=ON`), same weights (the GGUF is converted from the same "
            f"safetensors at the same precision), {c['threads']} thread{'s' * (c['threads'] != 1)} each, {c['max_num_seqs']} concurrent "
            f"sequences each, engines alternating per rate, median of {c['runs']} runs; the ratio row is the median "
            "of per-run ratios (lower is better for latencies). Before timing, ferry and llama.cpp at float32 must "
            "agree on greedy tokens and top-5 logprobs (within 1e-3) or the run stops. Goodput: requests per second "
            f"meeting TTFT ≤ {c['slo_ttft']:g} s and TPOT ≤ {1e3 * c['slo_tpot']:.0f} ms.")
    cmd = command({**rec, "scenario": "serving"})
    title = f"{TITLES['serving']} ({Path(rec['model']).name}, {c['dtype']})"
    return (f"### {title}\n\n{text}\n\n{markdown(rec)}\n\nReproduce: `{cmd}` (~10 min; the first run "
            "builds the peers into `bench/.cache/`).\n\n![](bench/results/serving.png)")


def quantization_section(rec: dict) -> str:
    """bench/quantization.py's block: the speed table (a precision per case) and ferry eval's quality table."""
    from bench.quantization import quality_table
    cfg = rec["config"]
    quality = (f"Quality (`ferry eval --parts ppl`, {rec['quality'][0]['ppl_tokens']} held-out tokens, float32 "
               "activations; top-1 agreement: the share of positions where the quantized model's greedy next token is "
               "float32's):\n\n" + quality_table(rec) + "\n\n") if rec.get("quality") else ""
    return (f"### {QUANT_TITLE} ({rec['model_name']}, {cfg['threads']} thread{'s' * (cfg['threads'] != 1)})\n\n"
            f"{offline_table(rec)}\n\nferry's int8/int4 run with {cfg['quant_dtype']} activations; llama.cpp's "
            "Q8_0/Q4_0 are its own quantizer's output (default per-tensor rules) from the float32 GGUF of the same "
            "weights" + (", run without its repacked / AMX weight buffers (`--llamacpp-extra-bufts off`: they crash "
                         "this machine)" if cfg.get("llamacpp_extra_bufts") == "off" else "") + f". {offline_note(rec)}\n\n{quality}Reproduce: `{command(rec)}` (results in "
            "`bench/results/quantization.{json,png}`).\n\n![](bench/results/quantization.png)")


def render(results: Path = RESULTS) -> dict[str, str]:
    """Block name -> its generated content, link targets relative to the repo root."""
    out: dict[str, str] = {}
    for s in SCENARIOS:
        # <scenario>.json (the default run) first, then runs saved with --out <scenario>-<name> (other models, dtypes)
        files = [f for f in [results / f"{s}.json", *sorted(results.glob(f"{s}-*.json"))] if f.is_file()]
        if not files:
            out[s] = f"### {TITLES[s]}\n\nNot measured yet: `ferry bench {s}` (or `make bench` for every scenario)."
            continue
        parts = []
        for f in files:
            rec = json.loads(f.read_text())
            section = serving_section(rec) if s == "serving" else offline_section(rec, s)
            parts.append(section.replace(f"bench/results/{s}.", f"bench/results/{f.stem}."))
        out[s] = "\n\n".join(parts)
    # bench/moe_offload.py: its own table layout (budgets x configurations); moe_offload.json, then any --out
    # moe_offload-<name>.json (e.g. the trained model's run)
    moe = [f for f in [results / "moe_offload.json", *sorted(results.glob("moe_offload-*.json"))] if f.is_file()]
    if moe:
        from bench.moe_report import markdown
        out["moe-offload"] = "\n\n".join(markdown(json.loads(f.read_text())) for f in moe)
    # bench/quantization.py: the offline table with a precision per case, then ferry eval's quality table
    quant = [f for f in [results / "quantization.json", *sorted(results.glob("quantization-*.json"))] if f.is_file()]
    out["quantization"] = "\n\n".join(
        quantization_section(json.loads(f.read_text())).replace("bench/results/quantization.",
                                                                      f"bench/results/{f.stem}.") for f in quant) \
        or f"### {QUANT_TITLE}\n\nNot measured yet: `ferry bench quantization`."
    for block, (stem, module) in SECTIONS.items():  # each scenario's module renders its record
        f = results / f"{stem}.json"
        out[block] = importlib.import_module(module).section(json.loads(f.read_text())) if f.is_file() else \
            f"Not measured yet: `python -m bench {block}`."
    out["summary"] = summary_block(results, out)
    return out


def summary_block(results: Path, blocks: dict[str, str]) -> str:
    """The README's summary table, each row linking to the first heading of its scenario's block."""
    from bench.summary import table
    links = {}
    for name in (*SCENARIOS, "moe-offload", "roofline", "quantization", "speculative"):
        heading = next((line.lstrip("#").strip() for line in blocks.get(name, "").splitlines()
                        if line.startswith("#")), None)
        links[name] = PAGE_OF[name] + (f"#{anchor(heading)}" if heading else "")
    return table(results, links)


def relink(content: str, page: str) -> str:
    """Rewrites the markdown link targets of content (relative to the repo root) relative to page's folder."""
    folder = Path(page).parent

    def fix(m: re.Match) -> str:
        target, frag = m.group(1).partition("#")[::2]
        rel = os.path.relpath(target, folder) if target else ""
        return f"]({rel}{'#' + frag if frag else ''})"

    return re.sub(r"\]\((?![a-z]+:|#)([^)\s]+)\)", fix, content)


def fill(text: str, blocks: dict[str, str]) -> str:
    """Replaces each block's marked region of text; blocks without a marker in text are left out."""
    for name, content in blocks.items():
        start, end = f"<!-- BENCH:{name} -->", f"<!-- /BENCH:{name} -->"
        if start not in text:
            continue
        block = f"{start}\n{content}\n{end}" if content else f"{start}\n{end}"
        if end in text:
            text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
        else:
            text = text.replace(start, block)
    return text


def update(root: Path, blocks: dict[str, str]) -> list[str]:
    """Fills every page under root with its blocks; returns the blocks that found no marker (to warn about)."""
    missing = []
    for page in PAGES:
        mine = {n: relink(c, page) for n, c in blocks.items() if PAGE_OF.get(n) == page}
        path = root / page
        text = path.read_text() if path.is_file() else ""
        missing += [n for n in mine if f"<!-- BENCH:{n} -->" not in text]
        if path.is_file():
            path.write_text(fill(text, mine))
    return missing


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ferry bench report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of <scenario>.json files")
    ap.add_argument("--into", type=Path, default=ROOT,
                    help=f"the folder whose pages ({', '.join(PAGES)}) are filled: the repo, or a copy of them")
    args = ap.parse_args(argv)
    for name in update(args.into, render(args.results)):
        print(f"{args.into / PAGE_OF[name]} has no <!-- BENCH:{name} --> marker; {name} skipped")
    print(f"benchmark tables in {', '.join(PAGES)} under {args.into} updated from {args.results}")


if __name__ == "__main__":
    main()

"""Online serving: ferry's server against llama.cpp's, same weights, same threads, Poisson arrivals.

Question: under a stream of requests arriving at a given rate, how do ferry's and llama.cpp's OpenAI-compatible
servers compare in output throughput, time to first token (TTFT), time per output token (TPOT) and goodput
(requests per second meeting the SLO TTFT <= --slo-ttft and TPOT <= --slo-tpot)?

Method (like vLLM's benchmark_serving): for each request rate, --num-requests requests with prompt and output
lengths drawn from the given ranges (seeded; prompts are random token ids, fresh every run so no prefix cache
helps), arriving as a Poisson process, each streamed over HTTP at temperature 0 with end-of-sequence disabled
(so every engine generates exactly the drawn number of tokens). Each engine's server is started by this script
on loopback with the same thread count and the same concurrency limit (ferry --max-num-seqs = llama-server
--parallel), weights in anonymous memory. Engines alternate per rate and the order rotates per run; each
number is the median over --runs runs (min/max and the per-run ratio ferry/peer kept in the JSON).
Before any timing: ferry (float32) and llama.cpp (float32 GGUF) must give the same greedy tokens and top-5
logprobs on the same prompts, offline; then each running server's greedy output is compared to ferry's server's
at the benchmark precision (reported as an agreement rate: bf16 rounds differently per engine).

    python -m bench serving                          # default (bf16, 2 threads, ~10 min); results/serving.{json,png}
    python -m bench serving --dtype float32 --out serving-f32
    python -m bench serving --model llama-1b         # any bench/models.py shape or a Hugging Face folder
    python -m bench serving --engines ferry,llama.cpp,llama-cpp-python   # add llama-cpp-python's own server
    python -m bench serving --report bench/results/serving.json          # the table (markdown), redraw the plot
    python -m bench serving --smoke                  # tiny model, 1 thread, ~1 min; bench/.cache/smoke/serving.json

The peers (llama-cpp-python, gguf, llama-server) install themselves into bench/.cache/ on first use: see
bench/peers/env.py (the first run compiles llama.cpp twice, ~40 min on 2 cores).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/serving.py` from the repo root
from bench.common import machine, memory_bandwidth_gbs, parse_range, ratio, result_path, summary
from bench.peers import client, gguf_export, servers
from bench.peers.env import versions
from bench.models import resolve
from bench.parity import agreement, check_prompts, offline_check

ENGINES = ("ferry", "llama.cpp", "llama-cpp-python")
OUTTYPE = {"bfloat16": "bf16", "float32": "f32"}
METRICS = ("output_tok_s", "request_s", "goodput_request_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
           "tpot_p99_s", "e2e_p99_s")


def make_server(name: str, args, model: Path, gguf: Path, ctx_per_seq: int) -> servers.Server:
    if name == "ferry":
        return servers.ferry(model, args.dtype, args.threads, args.max_num_seqs, args.ferry_args.split())
    kv_type = "f32" if args.dtype == "float32" else "f16"  # llama.cpp's default KV cache is f16
    if name == "llama.cpp":
        return servers.llama_server(gguf, args.threads, args.max_num_seqs, ctx_per_seq, kv_type,
                                    extra_args=args.llama_args.split())
    return servers.llama_cpp_python(gguf, args.threads, ctx_per_seq, kv_type)


def server_agreement(running: dict[str, servers.Server], vocab: int, max_tokens: int = 16) -> dict:
    """Each server's greedy tokens against ferry's server's, at the benchmark precision."""
    prompts = check_prompts(vocab, 4, seed=2)
    outs = {n: [client.complete(s, p, max_tokens) for p in prompts] for n, s in running.items()}
    ref = outs.get("ferry")
    return {n: agreement(ref, o)["agreement"] for n, o in outs.items() if ref is not None and n != "ferry"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="ferry bench serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b",
                    help="a bench/models.py shape (random weights), tiny-qwen2 / tiny-llama, or a Hugging Face folder")
    ap.add_argument("--engines", default="ferry,llama.cpp", help=f"comma list of {', '.join(ENGINES)}")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(OUTTYPE))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rates", default="0.5,1,2,inf", help="requests per second; inf sends all at once")
    ap.add_argument("--num-requests", type=int, default=16, help="per engine, rate and run")
    ap.add_argument("--input-len", default="32:256", help="prompt tokens, uniform in lo:hi")
    ap.add_argument("--output-len", default="16:64", help="output tokens, uniform in lo:hi")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=16, help="concurrency limit of every server")
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="seconds")
    ap.add_argument("--slo-tpot", type=float, default=0.2, help="seconds")
    ap.add_argument("--timeout", type=float, default=120.0, help="most seconds a run may exceed its last arrival")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ferry-args", default="", help="extra flags for ferry's server")
    ap.add_argument("--llama-args", default="", help="extra flags for llama-server")
    ap.add_argument("--out", default="serving", help="bench/results/<out>.{json,png}")
    ap.add_argument("--report", type=Path, help="print the markdown table of a saved JSON and redraw its plot")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 1 thread, short run; writes bench/.cache/smoke/serving.{json,png}")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model = "tiny-qwen2" if args.model == "qwen2.5-0.5b" else args.model
        args.threads, args.rates, args.num_requests = 1, "4,inf", 6
        args.input_len, args.output_len, args.runs, args.max_num_seqs = "8:48", "4:16", 2, 4
    if unknown := set(args.engines.split(",")) - set(ENGINES):
        ap.error(f"unknown engines {unknown}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        record = json.loads(args.report.read_text())
        plot(record, args.report.with_suffix(".png"))
        print(markdown(record))
        return
    engines = args.engines.split(",")
    model = resolve(args.model)
    gguf = gguf_export.ensure(model, OUTTYPE[args.dtype])
    record = {"scenario": "serving", "question": "online serving: ferry vs llama.cpp's server, Poisson arrivals", "machine": machine(),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "model": str(model), "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "engines": engines,
              "ratio_note": "ratio ferry/<peer> per run pair: > 1 is better for throughput and goodput, "
                            "< 1 is better for latencies"}
    # correctness first: float32 ferry vs float32 llama.cpp, offline, tokens and logprobs
    check = offline_check(model, gguf_export.ensure(model, "f32"), threads=args.threads)
    gc.collect()  # drop the float32 ferry model of the check before the servers load theirs
    record["parity_float32"] = {k: v for k, v in check.items() if k not in ("ferry", "llama.cpp")}
    print(f"float32 parity ferry vs llama.cpp: greedy agreement {check['agreement']:.1%}, "
          f"max logprob diff {check['max_logprob_diff']:.1e}")
    if not check["ok"]:
        finish(args, record)
        raise SystemExit("ferry and llama.cpp disagree at float32; not timing (see the JSON)")
    serve_and_measure(args, model, gguf, record)
    record["summary"] = summarize(record["runs"], engines, args.rates.split(","))
    finish(args, record)
    print_table(record)


def serve_and_measure(args, model: Path, gguf: Path, record: dict) -> None:
    """Start every engine's server, warm up, compare greedy outputs, run the rates; always stop the servers."""
    input_len, output_len = parse_range(args.input_len), parse_range(args.output_len)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    ctx_per_seq = max(input_len[1], 64) + max(output_len[1], 16) + 16  # 64, 16: the agreement check's sizes
    running = {n: make_server(n, args, model, gguf, ctx_per_seq) for n in args.engines.split(",")}
    try:
        for n, s in running.items():
            t = time.perf_counter()
            s.start()
            print(f"{n} up in {time.perf_counter() - t:.0f}s: {' '.join(s.cmd)}")
        record["commands"] = {n: s.cmd for n, s in running.items()}
        record["peers"] = versions()
        for n, s in running.items():  # warm-up: untimed, full-size requests
            warm = client.workload(2, math.inf, (input_len[1],) * 2, (output_len[1],) * 2, vocab, 10**6)
            if errors := [r.error for r in client.run(s, warm, 600)[0] if r.error]:
                raise RuntimeError(f"{n} failed the warm-up: {errors[0]}\n{s.log_tail()}")
        record["server_agreement"] = server_agreement(running, vocab)
        print(f"greedy agreement with ferry's server at {args.dtype}: {record['server_agreement']}")
        record["bandwidth_gbs_before"] = memory_bandwidth_gbs()
        rates = [float(r) for r in args.rates.split(",")]
        record["runs"] = measure(args, running, rates, input_len, output_len, vocab)
        record["bandwidth_gbs_after"] = memory_bandwidth_gbs()
    finally:
        for s in running.values():
            s.stop()


def finish(args, record: dict) -> None:
    """The JSON (bench/results/<out>.json, or bench/.cache/smoke/ for --smoke) and, with results, the plot."""
    path = result_path("serving", args.smoke, args.out)
    path.write_text(json.dumps(record, indent=2))
    print("saved", path)
    if "summary" in record:
        plot(record, path.with_suffix(".png"))


def measure(args, running: dict[str, servers.Server], rates: list[float], input_len, output_len, vocab: int) -> list:
    """runs[run][rate][engine] = metrics (+ raw per-request results); engines interleaved per rate."""
    names = list(running)
    runs = []
    for run in range(args.runs):
        order = names[run % len(names):] + names[:run % len(names)]  # rotate who goes first
        per_rate = {}
        for ri, rate in enumerate(rates):
            reqs = client.workload(args.num_requests, rate, input_len, output_len, vocab, args.seed + 1000 * run + ri)
            per_rate[str(rate)] = {}
            for n in order:
                client.wait_idle(running[n])
                results, duration = client.run(running[n], reqs, reqs[-1].arrival + args.timeout)
                m = client.metrics(results, duration, args.slo_ttft, args.slo_tpot)
                per_rate[str(rate)][n] = {**m, "requests": client.raw(results)}
                print(f"run {run} rate {rate:>4} {n:>16}: {m['output_tok_s']:7.1f} out tok/s  "
                      f"TTFT p50/p99 {m['ttft_p50_s']:.2f}/{m['ttft_p99_s']:.2f}s  TPOT p50/p99 "
                      f"{1e3 * m['tpot_p50_s']:.0f}/{1e3 * m['tpot_p99_s']:.0f}ms  goodput {m['goodput_request_s']:.2f} req/s"
                      f"  failed {m['failed']}", flush=True)
        runs.append(per_rate)
    return runs


def summarize(runs: list, engines: list[str], rates: list[str]) -> dict:
    """summary[rate][engine][metric] = median/min/max over runs; summary[rate]["ratio ferry/<peer>"][metric]."""
    out = {}
    for rate in [str(float(r)) for r in rates]:
        s = out[rate] = {}
        for n in engines:
            s[n] = {m: summary([r[rate][n][m] for r in runs]) for m in METRICS}
            s[n]["failed"] = sum(r[rate][n]["failed"] for r in runs)
        for peer in [e for e in engines if e != "ferry" and "ferry" in engines]:
            s[f"ratio ferry/{peer}"] = {m: summary([ratio(r[rate]["ferry"][m], r[rate][peer][m]) for r in runs])
                                        for m in METRICS}
    return out


def print_table(record: dict) -> None:
    print(f"\n{'rate':>6} {'engine':>16} {'out tok/s':>10} {'req/s':>6} {'goodput':>8} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}")
    for rate, s in record["summary"].items():
        for n in record["engines"]:
            v = {m: s[n][m]["median"] for m in METRICS}
            print(f"{rate:>6} {n:>16} {v['output_tok_s']:10.1f} {v['request_s']:6.2f} {v['goodput_request_s']:8.2f} "
                  f"{v['ttft_p50_s']:8.2f}s {v['ttft_p99_s']:8.2f}s {1e3 * v['tpot_p50_s']:7.0f}ms "
                  f"{1e3 * v['tpot_p99_s']:7.0f}ms")


def markdown(record: dict) -> str:
    """The README table: medians per rate and engine, then the ratio ferry/peer (median of per-run ratios)."""
    c = record["config"]
    head = ("| rate (req/s) | engine | output tok/s | req/s | goodput (req/s) | TTFT p50 | TTFT p99 | TPOT p50 "
            "| TPOT p99 |\n|---|---|---|---|---|---|---|---|---|")
    rows = []
    for rate, s in record["summary"].items():
        for n in [*record["engines"], *[k for k in s if k.startswith("ratio")]]:
            v = {m: s[n][m]["median"] for m in METRICS}
            if n.startswith("ratio"):
                x = {m: "n/a" if math.isnan(r) else f"{r:.2f}x" for m, r in v.items()}
                rows.append(f"| {rate} | *{n}* | {x['output_tok_s']} | {x['request_s']} | {x['goodput_request_s']} | "
                            f"{x['ttft_p50_s']} | {x['ttft_p99_s']} | {x['tpot_p50_s']} | {x['tpot_p99_s']} |")
            else:
                rows.append(f"| {rate} | {n} | {v['output_tok_s']:.1f} | {v['request_s']:.2f} | "
                            f"{v['goodput_request_s']:.2f} | {v['ttft_p50_s']:.2f} s | {v['ttft_p99_s']:.2f} s | "
                            f"{1e3 * v['tpot_p50_s']:.0f} ms | {1e3 * v['tpot_p99_s']:.0f} ms |")
    note = (f"{Path(record['model']).name}, {c['dtype']}, {c['threads']} thread{'s' * (c['threads'] != 1)}, "
            f"{c['num_requests']} requests per "
            f"point, prompts {c['input_len']} tokens, outputs {c['output_len']}, median of {c['runs']} runs; SLO TTFT "
            f"<= {c['slo_ttft']} s and TPOT <= {1e3 * c['slo_tpot']:.0f} ms; float32 parity: max logprob diff "
            f"{record['parity_float32']['max_logprob_diff']:.1e}; {c['dtype']} greedy agreement with ferry: "
            f"{record.get('server_agreement')}; memory bandwidth {record.get('bandwidth_gbs_before', 0):.0f}-"
            f"{record.get('bandwidth_gbs_after', 0):.0f} GB/s.")
    return "\n".join([head, *rows, "", note])


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter
    rates = list(record["summary"])
    xs = range(len(rates))
    panels = [("output_tok_s", "output tokens/s (higher is better)", False),
              ("ttft_p99_s", "TTFT p99, s (lower is better)", True),
              ("tpot_p99_s", "TPOT p99, s (lower is better)", True),
              ("goodput_request_s", "goodput, req/s meeting the SLO", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (m, label, log) in zip(axes, panels):
        for n in record["engines"]:
            s = [record["summary"][r][n][m] for r in rates]
            med = [v["median"] for v in s]
            err = [[v["median"] - v["min"] for v in s], [v["max"] - v["median"] for v in s]]
            ax.errorbar(list(xs), med, yerr=err, marker="o", capsize=3, label=n)
        ax.set_xticks(list(xs), [("all at once" if r == "inf" else r) for r in rates])
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(label, fontsize=10)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend()
    c = record["config"]
    threads = f"{c['threads']} thread" + ("s" if c["threads"] != 1 else "")
    fig.suptitle(f"{Path(record['model']).name} ({c['dtype']}), {threads}, {c['num_requests']} requests "
                 f"per point, prompts {c['input_len']}, outputs {c['output_len']}, median of {c['runs']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)


if __name__ == "__main__":
    main()

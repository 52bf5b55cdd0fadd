"""`python -m bench SCENARIO [options]` (also `ferry bench SCENARIO` from a source checkout).

Scenarios (each writes bench/results/<scenario>.{json,png}; `--smoke` runs a tiny version into bench/.cache/smoke/):
    throughput  offline, many mixed-length requests at once: ferry vs transformers vs llama.cpp
    decode      single-stream decode latency: ferry vs transformers vs llama.cpp
    prefill     prompt processing at 512, 2K and 8K tokens: ferry vs transformers vs llama.cpp
    serving     Poisson arrivals against the OpenAI servers: ferry vs llama.cpp's llama-server
    memory      peak RSS of each engine for the same job
    moe-offload MoE decode with experts on disk under a RAM budget: ferry's modes vs accelerate disk offload and
                llama.cpp mmap, each under the same cgroup memory limit (~15 min; not part of `all`)
    long-context KV policies (full, int8, spans at several budgets): KV bytes/token, sequences at a fixed KV budget,
                prefill and decode speed, retrieval accuracy and perplexity (~25 min; not part of `all`)
    quantization ferry float32 / bfloat16 / int8 / int4 against llama.cpp F32 / BF16 / Q8_0 / Q4_0: decode batch 1 and
                32 requests, plus perplexity and top-1 agreement of each precision from ferry eval (~20 min; not
                part of `all`)
    webui       the web page's cost: decode tok/s with and without a 1 Hz stats client, idle RSS with the page open
                (~2 min; not part of `all`)
    soak        the abuse campaign (issue 23) against a real `ferry serve` on ferry-tiny: mixed requests with
                disconnects, bursts, bad bodies, slow sockets, a tokenize flood, SIGTERM/SIGKILL; a table of
                outcomes and anomalies (~5-10 min; not part of `all`)
    speculative speculative decoding on ferry-tiny (+ ferry-tiny-draft): tok/s with and without ngram, phrase and
                draft, and llama.cpp's own draft/n-gram speculation, at concurrency 1, 4, 16: acceptance, output
                equivalence; ferry-tiny-moe with its experts on disk (~5 min; not part of `all`)
    route       R2R token routing (--speculative-method route, lossy) on ferry-tiny + ferry-tiny-draft: per router
                threshold the share of tokens the large model makes, greedy agreement / perplexity under it,
                retrieval, and tok/s against plain large-model decoding; calibrates the router first (~15 min)
    verify-cost the cost of verifying k drafts (k+1 rows per request) on the Qwen2.5-0.5B and Llama-1B shapes, batch 1
                and 16, and the speed-up it predicts at the acceptance `speculative` measured (~15 min)
    roofline    the per-operator roofline model (ferry roofline) against the measured step: decode and prefill at
                batch 1 and 16, float32 and bfloat16, Qwen2.5-0.5B and Llama-1B shapes (~15 min; not part of `all`)
    cluster     several instances on Ray: 1 x 2 threads vs 2 x 1 thread, live migration's pause and client gap by
                sequence length, per-block copy cost, prefill/decode split vs colocated (~15 min; not part of `all`)
    fairness    one flooding client + light clients against `ferry serve`, fcfs vs fair (recompute, swap): per-client
                share and TTFT, Jain's index, total throughput; swap copy cost block by block vs block groups
                (~10 min; not part of `all`)
    all         every scenario at its default size, then the benchmark tables (what `make bench` runs);
                `all --smoke` runs every smoke version and fills copies of the pages in bench/.cache/smoke/
    report      regenerate the README's summary and the tables in docs/ from bench/results/*.json
Every scenario first checks at float32 that all engines give ferry's greedy tokens; `SCENARIO --help` for options.
"""
from __future__ import annotations

import importlib
import sys

SCENARIOS = ("throughput", "decode", "prefill", "serving", "memory")
OTHER = {"moe-offload": "moe_offload", "long-context": "long_context", "webui": "webui", "soak": "soak",
         "speculative": "speculative", "verify-cost": "verify_cost", "route": "route",
         "roofline": "roofline", "cluster": "cluster", "fairness": "fairness",
         "quantization": "quantization"}  # scenario -> module, run only when asked for


def run(scenario: str, argv: list[str]) -> int:
    from bench import report
    if scenario == "report":
        report.main(argv)
        return 0
    if scenario == "all":  # --smoke fills copies of the pages in bench/.cache/smoke/, never the real ones
        for name in SCENARIOS:
            print(f"=== {name} ===", flush=True)
            importlib.import_module(f"bench.{name}").main(argv)
        if "--smoke" in argv:
            from bench.common import SMOKE
            for page in report.PAGES:  # copies of the README and docs pages, filled from the smoke results
                (SMOKE / page).parent.mkdir(parents=True, exist_ok=True)
                (SMOKE / page).write_text((report.ROOT / page).read_text())
            report.main(["--results", str(SMOKE), "--into", str(SMOKE)])
        else:
            report.main([])
        return 0
    if scenario in OTHER:
        importlib.import_module(f"bench.{OTHER[scenario]}").main(argv)
        return 0
    if scenario not in SCENARIOS:
        print(__doc__, file=sys.stderr)
        print(f"unknown scenario {scenario!r}", file=sys.stderr)
        return 2
    importlib.import_module(f"bench.{scenario}").main(argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    return run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())

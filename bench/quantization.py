"""Weight-only quantization: speed against llama.cpp at each precision, and what each precision costs in quality.

Question: at float32, bfloat16, int8 and int4, how fast does ferry decode one stream, read a 512- and a 2K-token
prompt and run a 32-request job against llama.cpp on the same weights at the matching precision (F32, BF16, Q8_0, Q4_0) — and how much perplexity
and greedy top-1 agreement does each precision give up (ferry eval, on the trained in-house models)?
- ferry int8/int4: `--quantization` at load (FineQuant's per-matrix group sizes, ferry/quant/), activations in
  --quant-dtype (bfloat16 by default: what the int kernels run fastest with where the CPU has it);
- llama.cpp Q8_0/Q4_0: the float32 GGUF of the same safetensors, quantized by llama.cpp's own quantizer
  (`llama_model_quantize`, bench/peers/gguf_quantize.py) with its default per-tensor rules; KV in f16 as llama.cpp;
- decode: a --prompt-len prompt, time(--max-tokens) - time(1 token), as bench/decode.py; prefill: prompt tokens /
  time to the first token, as bench/prefill.py; throughput: --num-requests
  requests of mixed lengths at once, as bench/throughput.py; engines alternate, --runs rounds after a warm-up;
- quality: `ferry eval --parts ppl` (perplexity of the held-out text, top-1 agreement with float32 on the same
  positions) of each --quality-models model at each precision (perplexity on random weights would say nothing).

    python -m bench quantization                   # qwen2.5-0.5b, 4 precisions (~20 min with the quality runs)
    python -m bench quantization --model llama-1b --out quantization-llama-1b
    python -m bench quantization --smoke           # tiny model, 1 thread (< 2 min), bench/.cache/smoke/
"""
from __future__ import annotations

import argparse
import random
import subprocess
from contextlib import ExitStack
from pathlib import Path

from bench.common import parse_range
from bench.engines import HERE, Unavailable, Worker, start
from bench.engines.worker import WorkerError
from bench.offline import Scenario, add_arguments, engine_options, parse_args, timed, warm_up
from bench.throughput import workload

# precision -> (ferry's dtype, ferry's --quantization, llama.cpp's GGUF type)
PRECISIONS = {"float32": ("float32", None, "f32"), "bfloat16": ("bfloat16", None, "bf16"),
              "int8": (None, "int8", "q8_0"), "int4": (None, "int4", "q4_0")}
QUALITY_MODELS = ("ferry-tiny", "ferry-tiny-moe", "stories260k")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ferry bench quantization", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, dtypes=",".join(PRECISIONS), runs=3)
    ap.set_defaults(engines="ferry,llama.cpp")
    ap.add_argument("--quant-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="ferry's activation dtype with int8/int4 weights")
    ap.add_argument("--quantization-lm-head", default=None, choices=("int8", "int4", "none"),
                    help="ferry's lm_head with int8/int4 (default: ferry's, int8 per channel; none: kept in float)")
    ap.add_argument("--prompt-len", type=int, default=128, help="decode: prompt tokens")
    ap.add_argument("--max-tokens", type=int, default=64, help="decode: tokens generated")
    ap.add_argument("--prefill-lens", default="512,2048", help="prefill: prompt lengths in tokens (empty: none)")
    ap.add_argument("--num-requests", type=int, default=32, help="throughput: requests per job, all at once")
    ap.add_argument("--input-len", default="32:256", help="throughput: prompt tokens, uniform in lo:hi")
    ap.add_argument("--output-len", default="32:128", help="throughput: output tokens, uniform in lo:hi")
    ap.add_argument("--llamacpp-extra-bufts", default="on", choices=("on", "off"),
                    help="llama.cpp's repacked / AMX weight buffers (its default: on); off where they crash on "
                         "Q8_0/Q4_0 (a segfault at the first decode on this AVX-512/AMX VM, llama-cpp-python 0.3.36)")
    ap.add_argument("--quality-models", default=",".join(QUALITY_MODELS),
                    help=f"models for ferry eval's columns ({', '.join(QUALITY_MODELS)} or folders; empty: none)")
    ap.add_argument("--ppl-tokens", type=int, default=16384, help="held-out tokens scored per quality model")
    args = parse_args(ap, argv, prompt_len=16, max_tokens=8, prefill_lens="32", num_requests=8, input_len="4:24", output_len="2:8",
                      dtypes="float32,int8,int4", quality_models="stories260k", ppl_tokens=1024)
    unknown = set(args.dtypes.split(",")) - set(PRECISIONS)
    if unknown:
        raise SystemExit(f"--dtypes: unknown precisions {sorted(unknown)}; use {', '.join(PRECISIONS)}")
    sc = Scenario("quantization", "decode and 32-request throughput at float32 / bfloat16 / int8 / int4: ferry vs "
                  "llama.cpp F32 / BF16 / Q8_0 / Q4_0; quality of each precision from ferry eval", args)
    sc.parity()
    for precision in args.dtypes.split(","):
        measure(sc, args, precision)
    sc.record["quality"] = quality(args)
    sc.save("tokens/s (higher is better)")


def measure(sc: Scenario, args: argparse.Namespace, precision: str) -> None:
    """The decode, prefill and throughput cases of one precision, every engine alternating."""
    vocab = sc.cfg["vocab_size"]
    inp, outp = parse_range(args.input_len), parse_range(args.output_len)
    n = args.num_requests
    prefill_lens = [int(x) for x in args.prefill_lens.split(",") if x]
    longest = max([args.prompt_len + args.max_tokens, *prefill_lens])
    tokens = max(n * (inp[1] + outp[1]), longest)
    max_len = max(inp[1] + outp[1], longest) + 16
    rng = random.Random(0)
    with ExitStack() as stack:
        workers = start_workers(sc, stack, precision, tokens, n, max_len)
        warm_up(workers, "decode", prompt=[5] * args.prompt_len, max_tokens=min(8, args.max_tokens))
        prompts = iter([[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(64 * args.runs)])
        fns = {e: timed(w, args.timeout, "decode", "tok_s", lambda: {"prompt": next(prompts),
                                                                       "max_tokens": args.max_tokens})
               for e, w in workers.items()}
        sc.case(f"decode batch 1, {args.prompt_len}-token prompt, {args.max_tokens} tokens", precision, "tok/s", fns)
        for length in prefill_lens:  # as bench/prefill.py: a fresh prompt per call, tokens / time to first token
            fresh = (lambda length=length: {"prompt": [rng.randrange(3, vocab) for _ in range(length)]})
            fns = {e: timed(w, args.timeout, "prefill", "tok_s", fresh) for e, w in workers.items()}
            sc.case(f"prefill {length} tokens", precision, "tok/s", fns, prompt_len=length)
        calls: dict[str, int] = {}

        def job(engine: str) -> dict:
            calls[engine] = calls.get(engine, 0) + 1
            return workload(n, inp, outp, vocab, seed=calls[engine])

        fns = {e: timed(w, args.timeout, "generate", "tok_s", lambda e=e: job(e)) for e, w in workers.items()}
        sc.case(f"{n} requests, prompts {args.input_len}, outputs {args.output_len}", precision, "output tok/s", fns,
                num_requests=n)


def start_workers(sc: Scenario, stack: ExitStack, precision: str, num_tokens: int, num_seqs: int,
                  max_len: int) -> dict:
    """engine -> running Worker at precision (closed with the stack), or the reason it is not running."""
    args = sc.args
    dtype, method, gguf_type = PRECISIONS[precision]
    dtype = dtype or args.quant_dtype
    out: dict[str, Worker | str] = {}
    for name in sc.engines:
        if name in sc.unavailable:
            out[name] = sc.unavailable[name]
            continue
        try:
            if name == "ferry":
                opts = engine_options("ferry", args, sc.cfg, dtype, num_tokens, num_seqs, max_len)
                quant = {"quantization": method, **head_option(args)} if method else {}
                w = start("ferry", sc.model, dtype, args.threads, **opts, **quant)
            elif name == "llama.cpp":
                w = llamacpp_worker(sc.model, gguf_type, args.threads, args.llamacpp_extra_bufts == "on")
            else:
                raise Unavailable(f"{name} has no int8/int4 weights comparable to these; not run here")
            out[name] = stack.enter_context(w)
            print(f"[{sc.name}] {name} {precision} loaded in {out[name].info['load_s']:.0f}s", flush=True)
        except (Unavailable, WorkerError, TimeoutError, subprocess.CalledProcessError, NotImplementedError) as e:
            out[name] = str(e).splitlines()[0][:200]
    return out


def head_option(args: argparse.Namespace) -> dict:
    """--quantization-lm-head as ferry's keyword, when given (else ferry's default)."""
    return {} if args.quantization_lm_head is None else {"quantization_lm_head": args.quantization_lm_head}


def llamacpp_worker(model: Path, gguf_type: str, threads: int, extra_bufts: bool = True) -> Worker:
    """llama.cpp on the GGUF of model at gguf_type (f32 / bf16 exported, q8_0 / q4_0 quantized by llama.cpp)."""
    from bench.peers.env import peer_python
    if gguf_type in ("f32", "bf16"):
        from bench.peers.gguf_export import ensure
        path = ensure(model, gguf_type)
    else:
        from bench.peers.gguf_quantize import ensure
        path = ensure(model, gguf_type, threads)
    kv_dtype = "float32" if gguf_type == "f32" else "bfloat16"  # the worker keeps f32 KV for f32, else f16
    return Worker("llama.cpp", [peer_python(), str(HERE / "llamacpp_engine.py"), "--worker"],
                  {"model": str(path), "dtype": kv_dtype, "threads": threads, "extra_bufts": extra_bufts})


def quality(args: argparse.Namespace) -> list[dict]:
    """Per quality model: float32's perplexity, then per quantized precision its perplexity, change and top-1
    agreement with float32 (ferry eval --parts ppl, in this process, float32 activations)."""
    from ferry.eval.suite import EvalConfig, evaluate
    names = [m for m in args.quality_models.split(",") if m]
    methods = [PRECISIONS[p][1] for p in args.dtypes.split(",") if PRECISIONS[p][1]]
    cfg = EvalConfig(parts=("ppl",), ppl_tokens=args.ppl_tokens)
    rows = []
    for name in names:
        path = quality_model(name)
        row = {"model": name, "path": str(path), "ppl_tokens": args.ppl_tokens, "precisions": {}}
        for method in methods:
            base, q = evaluate(str(path), {"dtype": "float32", "quantization": method, **head_option(args)}, cfg)
            row["precisions"]["float32"] = {"perplexity": base.perplexity["perplexity"]}
            row["precisions"][method] = {"perplexity": q.perplexity["perplexity"], **q.agreement}
            print(f"[quantization] {name} {method}: perplexity {q.perplexity['perplexity']:.3f} "
                  f"({q.agreement['perplexity_change']:+.2%} vs float32 {base.perplexity['perplexity']:.3f}), "
                  f"top-1 agreement {q.agreement['top1_agreement']:.1%}", flush=True)
        rows.append(row)
    return rows


def quality_model(name: str) -> Path:
    from ferry.default_model import inhouse_path
    if name == "stories260k":
        return Path(__file__).resolve().parents[1] / "tests" / "assets" / "stories260k-hf"
    if name in ("ferry-tiny", "ferry-tiny-moe"):
        return inhouse_path(name)
    return Path(name)


def quality_table(record: dict) -> str:
    """A row per quality model: float32 perplexity, then per quantized precision its change and top-1 agreement."""
    rows = record.get("quality") or []
    if not rows:
        return ""
    methods = [m for m in ("int8", "int4") if any(m in r["precisions"] for r in rows)]
    head = ["model", "float32 perplexity", *[f"{m}: perplexity (change)" for m in methods],
            *[f"{m}: top-1 agreement" for m in methods]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = r["precisions"]
        cells = [r["model"], f"{p['float32']['perplexity']:.3f}"]
        cells += [f"{p[m]['perplexity']:.3f} ({p[m]['perplexity_change']:+.2%})" if m in p else "—" for m in methods]
        cells += [f"{p[m]['top1_agreement']:.1%}" if m in p else "—" for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

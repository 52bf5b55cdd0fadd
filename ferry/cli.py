"""`ferry generate | chat | serve | run | eval | roofline | convert | bench` — `ferry` and `python -m ferry` are the same CLI.

Engine flags come from ferry/engine/options.py (each is also a keyword of ferry.LLM); sampling flags are
SamplingParams fields with the same names. `--seed` is the engine's: it makes sampling reproducible."""
from __future__ import annotations

import argparse
import pathlib
import sys

from ferry.engine.options import ENGINE_OPTIONS, add_engine_arguments, engine_kwargs, parse_size
from ferry.errors import FerryError
from ferry.eval.tasks import TASKS
from ferry.request import SamplingParams
from ferry.roofline.command import add_arguments as roofline_arguments

SAMPLING_FLAGS = (  # (SamplingParams field, type, help)
    ("max_tokens", int, "tokens to generate at most"),
    ("temperature", float, "0 is greedy"),
    ("top_p", float, "nucleus sampling mass"),
    ("top_k", int, "sample among the k best (0: all)"),
    ("min_p", float, "drop tokens below min_p x the best probability"),
    ("repetition_penalty", float, "HF-style penalty over prompt and output (1: off)"),
    ("presence_penalty", float, "OpenAI presence penalty"),
    ("frequency_penalty", float, "OpenAI frequency penalty"),
    ("n", int, "completions per prompt"),
)


def _add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    group = parser.add_argument_group("sampling")
    for name, typ, help_ in SAMPLING_FLAGS:
        group.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_)
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.set_defaults(default_max_tokens=max_tokens)


def _sampling_params(args: argparse.Namespace, defaults: dict | None = None) -> SamplingParams:
    """Flags given win; then the checkpoint's generation_config.json defaults (ferry chat passes them); then
    greedy for a temperature neither sets."""
    from ferry.engine.inputs import sampling_params

    kw = {name: getattr(args, name) for name, _, _ in SAMPLING_FLAGS if getattr(args, name) is not None}
    kw.setdefault("max_tokens", args.default_max_tokens)
    if "temperature" not in (defaults or {}):
        kw.setdefault("temperature", 0.0)
    if args.stop:
        kw["stop"] = args.stop
    return sampling_params(kw, defaults)


def cmd_generate(args: argparse.Namespace) -> int:
    from ferry.engine.llm import LLM

    params = _sampling_params(args)
    with LLM(args.model, **engine_kwargs(args)) as llm:  # closing saves what the engine learned (expert statistics)
        return _generate(llm, args, params)


def _generate(llm, args: argparse.Namespace, params: SamplingParams) -> int:
    if len(args.prompt) == 1 and params.n == 1:  # one prompt: stream it
        printed = 0
        for out in llm.stream(args.prompt[0], params):
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
        sys.stdout.write("\n")
        return 0
    for prompt, out in zip(args.prompt, llm.generate(args.prompt, params)):
        for c in out.outputs:
            print(f"--- prompt: {prompt!r}" + (f" [{c.index}]" if params.n > 1 else ""))
            print(c.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ferry.engine.llm import LLM

    _sampling_params(args)  # bad flags fail before the model loads
    with LLM(args.model, **engine_kwargs(args)) as llm:
        return _chat(llm, args, _sampling_params(args, llm.engine.inputs.sampling_defaults))


def _chat(llm, args: argparse.Namespace, params: SamplingParams) -> int:
    if not llm.tokenizer.has_chat_template:
        print(f"error: {args.model} has no chat template in tokenizer_config.json; use `ferry generate`", file=sys.stderr)
        return 2
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("ferry chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = llm.tokenizer.apply_chat_template(messages)
        printed, text = 0, ""
        for out in llm.stream({"prompt_token_ids": ids}, params):
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": text})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ferry.server.app import run_server, server_kwargs

    run_server(args.model, **server_kwargs(args), **engine_kwargs(args))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ferry.default_model import default_model_path
    from ferry.server.app import run_server, server_kwargs

    path = default_model_path()
    kw = server_kwargs(args)
    kw["served_model_name"] = kw["served_model_name"] or "ferry-tiny"
    url = f"http://{kw['host']}:{kw['port']}/v1"
    print(f"""ferry: serving the in-house model ferry-tiny ({path}) as "{kw['served_model_name']}" at {url}
  (4.2M parameters, trained by the project on the Python and Debian documentation: expect doc-like text)
  curl {url}/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{kw['served_model_name']}", "prompt": "The os module provides", "max_tokens": 32}}'
  or: openai.OpenAI(base_url="{url}", api_key="none").completions.create(model="{kw['served_model_name']}", prompt="Hi")"""
          + (f"\n  web page: http://{kw['host']}:{kw['port']}/" if kw["webui"] else ""),
          file=sys.stderr, flush=True)
    run_server(str(path), **kw, **engine_kwargs(args))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if (args.expert_store is None) == (args.quantization is None):
        print("error: ferry convert writes an expert store (--expert-store DIR) or a quantized model "
              "(--quantization int8|int4 --out DIR): give one of the two", file=sys.stderr)
        return 2
    if args.quantization is not None:
        return _convert_quantized(args)
    if args.out is not None or args.quantization_group_size is not None or args.quantization_lm_head is not None:
        print("error: --out, --quantization-group-size and --quantization-lm-head go with --quantization",
              file=sys.stderr)
        return 2
    from ferry.experts.convert import convert_expert_store
    from ferry.quant.folder import read_manifest

    if read_manifest(args.model) is not None:
        print(f"error: {args.model} is a quantized folder; build the expert store from the original checkpoint",
              file=sys.stderr)
        return 2
    if (args.expert_bits == "auto") != (args.expert_store_size is not None):
        print("error: --expert-bits auto chooses each expert's bits to fit --expert-store-size SIZE (e.g. 200M); "
              "give both, or neither", file=sys.stderr)
        return 2
    plan = _plan_expert_bits(args) if args.expert_bits == "auto" else None
    index = convert_expert_store(args.model, args.expert_store, args.dtype, args.expert_bits, plan)
    bits = [r.bits for recs in index.experts.values() for r in recs]
    kinds = ", ".join(f"{bits.count(b)} {'int%d' % b if b else index.layout.dtype}" for b in sorted(set(bits)))
    print(f"wrote {len(bits)} experts ({kinds}; {index.total_nbytes / 2**20:.1f} MiB) to {args.expert_store}"
          + (f"; every expert's options and choice: {args.expert_store}/expert_bits.json; --expert-cache-memory "
             f"{index.total_nbytes / 2**20:.1f}M holds every expert" if plan else ""), file=sys.stderr)
    return 0


def _plan_expert_bits(args: argparse.Namespace):
    """--expert-bits auto: record the experts' inputs on held-out text, measure, choose (ferry/experts/allocate.py)."""
    from ferry.eval.activations import record_expert_inputs
    from ferry.eval.suite import HELDOUT
    from ferry.experts.convert import check_store_size, plan_expert_bits

    check_store_size(args.model, args.expert_store_size, args.dtype)  # a bad size fails before the recording
    calibration = record_expert_inputs(args.model, args.text or HELDOUT, args.calibration_tokens,
                                       args.calibration_rows, "float32" if args.dtype == "auto" else args.dtype)
    plan = plan_expert_bits(args.model, calibration, args.expert_store_size, args.dtype,
                            progress=lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(plan.layer_summary()), file=sys.stderr)
    return plan


def _convert_quantized(args: argparse.Namespace) -> int:
    from ferry.quant.convert import convert_quantized

    if args.out is None:
        print("error: --quantization needs --out DIR (the quantized folder to write)", file=sys.stderr)
        return 2
    done = convert_quantized(args.model, args.out, args.quantization, args.quantization_group_size,
                             args.quantization_lm_head)
    m = done.manifest
    print(f"wrote {args.out}: {done.summary}; {m.weights_nbytes / 2**20:.1f} MiB (the checkpoint: "
          f"{done.source_nbytes / 2**20:.1f} MiB); run it with `ferry generate {args.out} ...` or LLM({str(args.out)!r})",
          file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from ferry.eval.report import heatmap, table
    from ferry.eval.suite import EvalConfig, evaluate, to_json

    cfg = EvalConfig(tasks=tuple(args.tasks), lengths=tuple(args.lengths or ()), depths=tuple(args.depths),
                     samples=args.samples, ppl_tokens=args.ppl_tokens, draft=args.draft, seed=args.eval_seed,
                     parts=tuple(args.parts), **({"text": args.text} if args.text else {}))
    defaults = {o.name: o.default for o in ENGINE_OPTIONS}
    options = {k: v for k, v in engine_kwargs(args).items() if v != defaults[k]}
    if (args.expert_bits is None) != (args.expert_store_size is None):
        print("error: --expert-bits auto and --expert-store-size SIZE go together (quality of expert stores next to "
              "their size)", file=sys.stderr)
        return 2
    if args.expert_bits is not None:
        return _eval_expert_bits(args, options, cfg)
    reports = evaluate(args.model, options, cfg)
    print(table(reports))
    if args.json:
        args.json.write_text(json.dumps(to_json(reports, cfg), indent=1))
    if args.plot:
        heatmap(reports, args.plot)
    return 0


def _eval_expert_bits(args: argparse.Namespace, options: dict, cfg) -> int:
    """ferry eval MODEL --expert-bits auto --expert-store-size SIZE: one table of quality next to size."""
    import json

    from ferry.eval.bits import bits_json, bits_table, compare_expert_bits

    rows = compare_expert_bits(args.model, args.expert_store_size, options, cfg)
    print(bits_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"expert_store_size": args.expert_store_size, "rows": bits_json(rows)},
                                        indent=1))
    return 0


def cmd_roofline(args: argparse.Namespace) -> int:
    from ferry.roofline.command import run_command

    return run_command(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """The benchmark suite lives in bench/ of a source checkout (next to ferry/), not in the installed package."""
    from pathlib import Path

    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "bench" / "__main__.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        from bench.__main__ import run
    except ImportError:
        print("error: `ferry bench` runs the benchmark suite in bench/ of a ferry source checkout (git clone, then "
              "`pip install -e .`); this installation has no bench/ folder next to ferry/", file=sys.stderr)
        return 2
    return run(args.scenario, args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description="LLM inference and serving for machines smaller than the model")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text offline")
    p.add_argument("model", help="local Hugging Face folder (config.json + *.safetensors + tokenizer)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    _add_sampling_arguments(p, max_tokens=64)
    add_engine_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat using the checkpoint's chat template")
    p.add_argument("model")
    p.add_argument("--system", default=None, help="system message")
    _add_sampling_arguments(p, max_tokens=256)
    add_engine_arguments(p)
    p.set_defaults(func=cmd_chat)

    for name, func, help_ in (("serve", cmd_serve, "OpenAI-compatible HTTP server"),
                              ("run", cmd_run, "serve the built-in default model")):
        p = sub.add_parser(name, help=help_)
        if name == "serve":
            p.add_argument("model")
        _add_server_arguments(p)
        add_engine_arguments(p)
        p.set_defaults(func=func)

    p = sub.add_parser("eval", help="quality: perplexity, retrieval by length and depth, draft acceptance, MoE routing; "
                                    "with engine options, side by side with full precision")
    p.add_argument("model")
    p.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS, help="retrieval tasks (none: skip)")
    p.add_argument("--lengths", nargs="+", type=int, help="context lengths (default: 512, 1024, ... up to the model's)")
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=4, help="samples per task, length and depth")
    p.add_argument("--ppl-tokens", type=int, default=16384, help="held-out tokens scored for perplexity")
    p.add_argument("--draft", help="a draft model folder: report its greedy acceptance rate against MODEL")
    p.add_argument("--text", type=pathlib.Path, help="held-out text file (default: the bundled one)")
    p.add_argument("--parts", nargs="+", default=["ppl", "retrieval", "draft", "moe"],
                   choices=["ppl", "retrieval", "draft", "moe"], help="what to evaluate")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the task generator")
    p.add_argument("--json", type=pathlib.Path, help="write the report as JSON")
    p.add_argument("--plot", type=pathlib.Path, help="write a PNG heat map of accuracy by length and depth")
    p.add_argument("--expert-bits", choices=("auto",), help="MoE: instead of the suite, perplexity and top-1 agreement "
                   "of expert stores (uniform int8, int4, and auto at --expert-store-size on recorded and on Gaussian "
                   "inputs) beside full precision")
    p.add_argument("--expert-store-size", type=_size, help="with --expert-bits auto: bytes of expert records (e.g. 3M)")
    add_engine_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("roofline", help="per-operator roofline of a decode / prefill step on this machine's measured "
                                        "bandwidth and peaks, beside the measured step (LLM-Viewer's analysis)")
    roofline_arguments(p)
    p.set_defaults(func=cmd_roofline)

    p = sub.add_parser("convert", help="write a weight-only int8/int4 model (--quantization int4 --out DIR) or a MoE "
                                       "model's experts as an expert store (--expert-store DIR)")
    p.add_argument("model")
    p.add_argument("--quantization", choices=("int8", "int4"), help="quantize every linear of the decoder and write "
                   "the folder --out: it loads as it is (`ferry generate DIR`)")
    p.add_argument("--quantization-group-size", type=int, help="with --quantization: inputs per scale for every "
                   "matrix (a multiple of 32; default: int8 per channel, int4 chosen per matrix)")
    p.add_argument("--quantization-lm-head", choices=("int8", "int4", "none"), help="with --quantization: the "
                   "lm_head's precision (a tied model's embedding table, which is its head; default: int8 per channel)")
    p.add_argument("--out", help="with --quantization: the folder to write (new or empty)")
    p.add_argument("--expert-store", help="output folder of an expert store; run with --expert-store DIR")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="with --expert-store: the experts' dtype (default: auto)")
    p.add_argument("--expert-bits", default="none", choices=("none", "8", "4", "auto"),
                   help="with --expert-store: store experts as int8 / int4 with group-wise scales (lossy); auto: each "
                        "expert's format (dense, int8, int4 at a group size) chosen to fit --expert-store-size with "
                        "the least output error measured on inputs recorded from held-out text (default: none)")
    p.add_argument("--expert-store-size", type=_size, help="with --expert-bits auto: bytes of expert records "
                   "(e.g. 200M, 1.5G)")
    p.add_argument("--text", type=pathlib.Path, help="with --expert-bits auto: held-out text to record the experts' "
                   "inputs on (default: the eval's bundled text; its last --calibration-tokens tokens)")
    p.add_argument("--calibration-tokens", type=int, default=8192, help="with --expert-bits auto: tokens recorded")
    p.add_argument("--calibration-rows", type=int, default=128, help="with --expert-bits auto: sampled input rows "
                   "kept per expert (memory: rows x hidden x 4 bytes per expert)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("bench", help="benchmark suite against transformers and llama.cpp (source checkout only)",
                       description="ferry bench SCENARIO [options]: throughput, decode, prefill, serving, memory, "
                                   "all, report; `ferry bench SCENARIO --help` for each one's options")
    p.add_argument("scenario", help="throughput | decode | prefill | serving | memory | all | report")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="the scenario's options")
    p.set_defaults(func=cmd_bench)
    return parser


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except FerryError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    from ferry.server.app import add_server_arguments

    add_server_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FerryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""llama.cpp offline, through llama-cpp-python's low-level API (ctypes over libllama), in the peers venv.

llama-cpp-python's high-level `Llama` runs one sequence per context (no batched generate), and its `eval`
keeps logits only with logits_all. The low-level API is the whole of libllama, so this drives it directly,
as llama.cpp's own `batched` and `llama-bench` tools do: one llama_batch carrying tokens of many sequences
(seq_id per token), a unified KV cache, greedy argmax over the returned logits.

Ops (each prints one JSON object):
    greedy   {"prompts": [[ids]], "max_tokens": n}               -> {"token_ids": [[ids]]}
    decode   {"prompt": [ids], "max_tokens": n}                  -> {"tok_s": decode rate after the prefill}
    prefill  {"prompt": [ids]}                                   -> {"tok_s": prompt tokens / time to first logits}
    batched  {"prompts": [[ids]], "max_tokens": n}               -> {"tok_s": generated tokens / total time, ...}
every op also takes "model" (a GGUF path), "threads", and optionally "kv_type" ("f16" default, as llama.cpp;
"f32" for the exactness check), "flash_attn" ("auto" default, as llama.cpp's tools; "off"), "n_batch", "quiet".

From the main venv: `run(op, **kw)` runs this file with the peers' python and returns the JSON.

    .venv/bin/python bench/peers/llamacpp.py --smoke     # tiny GGUFs, 1 thread, every op (runs in the peers venv)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_QUIET = None
FLASH = {"auto": -1, "off": 0, "on": 1}   # LLAMA_FLASH_ATTN_TYPE_*
KV_TYPES = {"f32": 0, "f16": 1}           # GGML_TYPE_*


def run(op: str, timeout: float | None = None, **kw) -> dict:
    """Run one op in the peers venv (llama.cpp's logs go to stderr, shown only if it fails)."""
    from bench.peers.env import peer_python
    r = subprocess.run([peer_python(), str(Path(__file__)), "--op", op], input=json.dumps(kw),
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp {op} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


class Offline:
    """One libllama model + context. n_seq_max sequences share a unified KV cache of n_ctx tokens."""

    def __init__(self, model: str, threads: int, n_ctx: int, n_seq_max: int = 1, kv_type: str = "f16",
                 flash_attn: str = "auto", n_batch: int = 512, quiet: bool = False) -> None:
        import llama_cpp as L
        self.L = L
        if quiet:
            global _QUIET
            _QUIET = L.llama_log_callback(lambda level, text, user: None)  # kept alive: libllama calls it
            L.llama_log_set(_QUIET, None)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.load_mode = L.LLAMA_LOAD_MODE_NONE  # read into anonymous memory, no mmap: the host drops idle
                                               # file-backed pages (DESIGN.md), which would bill llama.cpp for disk reads
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(model).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq_max
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = KV_TYPES[kv_type]
        cp.flash_attn_type = FLASH[flash_attn]
        cp.kv_unified = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.batch = L.llama_batch_init(n_batch, 0, 1)

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, pos, seq_id, wants_logits), at most n_batch of them."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed (KV cache full?)")

    def _logits(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def _argmax(self, i: int) -> int:
        return int(np.argmax(self._logits(i)))

    def top_logprobs(self, i: int, k: int) -> list[tuple[int, float]]:
        """The k best (token id, log-probability) of batch entry i, best first."""
        x = self._logits(i).astype(np.float64)
        lp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        ids = np.argsort(-lp)[:k]
        return [(int(t), float(lp[t])) for t in ids]

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        """Prefill every prompt (seq_id = its index), in batches of n_batch tokens; the first token of each."""
        items = [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)]
        first: list[int] = [0] * len(prompts)
        for k in range(0, len(items), self.n_batch):
            chunk = items[k:k + self.n_batch]
            self._decode(chunk)
            for i, (_, _, s, last) in enumerate(chunk):
                if last:
                    first[s] = self._argmax(i)
        return first

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Greedy, all sequences decoded together (one batch entry per sequence per step), no stop on eos."""
        self.clear()
        out = [[t] for t in self.prefill(prompts)]
        for step in range(1, max_tokens):
            self._decode([(o[-1], len(p) + step - 1, s, True) for s, (p, o) in enumerate(zip(prompts, out))])
            for s, o in enumerate(out):
                o.append(self._argmax(s))
        return out


def op_greedy(llm: Offline, a: dict) -> dict:
    """Greedy tokens per prompt, one at a time, with the top-k logprobs at every step (k = "logprobs", 5)."""
    k = a.get("logprobs", 5)
    token_ids, logprobs = [], []
    for p in a["prompts"]:
        llm.clear()
        llm.prefill([p])
        tops = [llm.top_logprobs(-1, k)]
        out = [tops[0][0][0]]
        for step in range(1, a["max_tokens"]):
            llm._decode([(out[-1], len(p) + step - 1, 0, True)])
            tops.append(llm.top_logprobs(-1, k))
            out.append(tops[-1][0][0])
        token_ids.append(out)
        logprobs.append(tops)
    return {"token_ids": token_ids, "logprobs": logprobs}


def op_decode(llm: Offline, a: dict) -> dict:
    """Single stream: time of max_tokens tokens minus the time of one (the prefill), as bench/engine_vs_hf.py."""
    p, n = a["prompt"], a["max_tokens"]
    t = time.perf_counter(); llm.generate([p], 1); one = time.perf_counter() - t
    t = time.perf_counter(); llm.generate([p], n); full = time.perf_counter() - t
    return {"tok_s": (n - 1) / max(full - one, 1e-9)}


def op_prefill(llm: Offline, a: dict) -> dict:
    t = time.perf_counter(); llm.generate([a["prompt"]], 1)
    return {"tok_s": len(a["prompt"]) / (time.perf_counter() - t)}


def op_batched(llm: Offline, a: dict) -> dict:
    t = time.perf_counter(); out = llm.generate(a["prompts"], a["max_tokens"]); dt = time.perf_counter() - t
    n = sum(len(o) for o in out)
    return {"tok_s": n / dt, "seconds": dt, "generated_tokens": n}


OPS = {"greedy": op_greedy, "decode": op_decode, "prefill": op_prefill, "batched": op_batched}


def execute(op: str, a: dict) -> dict:
    prompts = a.get("prompts") or [a["prompt"]]
    n_ctx = sum(len(p) for p in prompts) + len(prompts) * a.get("max_tokens", 1) + 16
    n_seq = len(prompts) if op == "batched" else 1
    llm = Offline(a["model"], a["threads"], n_ctx=max(n_ctx, 256), n_seq_max=n_seq, kv_type=a.get("kv_type", "f16"),
                  flash_attn=a.get("flash_attn", "auto"), n_batch=a.get("n_batch", 512), quiet=a.get("quiet", False))
    return OPS[op](llm, a)


def smoke() -> None:
    """Every op on the tiny float32 GGUFs, 1 thread (the batched greedy tokens should equal one-at-a-time ones)."""
    gguf_dir = Path(__file__).resolve().parents[1] / ".cache" / "gguf"
    models = sorted(gguf_dir.glob("tiny-*-f32.gguf"))
    if not models:
        raise SystemExit("no tiny GGUF: run `.venv/bin/python bench/peers/llamacpp.py --smoke` from the main venv")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 32000, size=n).tolist() for n in (5, 9, 17)]
    for m in models:
        base = {"model": str(m), "threads": 1, "quiet": True}
        exact = {"kv_type": "f32", "flash_attn": "off"}
        one = execute("greedy", {**base, **exact, "prompts": prompts, "max_tokens": 8})["token_ids"]
        llm = Offline(m, 1, n_ctx=256, n_seq_max=len(prompts), quiet=True, **exact)
        together = llm.generate(prompts, 8)
        print(f"{m.name}: greedy {one[0]}; batched == one at a time: {together == one}")
        print(f"{m.name}: decode {execute('decode', {**base, 'prompt': prompts[0], 'max_tokens': 16})['tok_s']:.0f} tok/s, "
              f"prefill {execute('prefill', {**base, 'prompt': prompts[2] * 8})['tok_s']:.0f} tok/s, "
              f"batched {execute('batched', {**base, 'prompts': prompts, 'max_tokens': 8})['tok_s']:.0f} tok/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=sorted(OPS), help="read the op's JSON arguments from stdin")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:  # the main venv: build the tiny GGUFs here, run the ops in the peers venv
            sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
            from bench.peers.env import peer_python
            from bench.peers.gguf_export import ensure
            from bench.peers.tiny import TINY, build_tiny
            for shape in TINY:
                ensure(build_tiny(shape), "f32")
            subprocess.run([peer_python(), __file__, "--smoke"], check=True)
            return
        smoke()
    elif args.op:
        print(json.dumps(execute(args.op, json.loads(sys.stdin.read()))))
    else:
        ap.error("--op or --smoke")


if __name__ == "__main__":
    main()

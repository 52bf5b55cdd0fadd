"""llama.cpp offline, through llama-cpp-python's low-level API (ctypes over libllama), in the peers venv.

llama-cpp-python's high-level `Llama` runs one sequence per context (no batched generate), and its `eval`
keeps logits only with logits_all. The low-level API is the whole of libllama, so this drives it directly,
as llama.cpp's own `batched` and `llama-bench` tools do: one llama_batch carrying tokens of many sequences
(seq_id per token), a unified KV cache, greedy argmax over the returned logits.

It runs as a worker of bench/engines (`python bench/engines/llamacpp_engine.py --worker`, the same JSON-lines ops as
ferry's and transformers' workers): the model is loaded once (into anonymous memory, no mmap); each job gets a
fresh context sized to it (KV cache of the job's tokens, one sequence per prompt), made before its timer
starts. Worker options: "model" (a GGUF path), "threads", and optionally "kv_type" ("f16" default, as
llama.cpp; "f32" for the exactness check; the worker picks f32 for float32 GGUFs), "flash_attn" ("auto"
default, as llama.cpp's tools; "off"), "n_batch" (512), "quiet".

    .venv/bin/python bench/engines/llamacpp_engine.py --smoke     # tiny GGUFs, 1 thread, every op (runs in the peers venv)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: bench.engines.worker
from bench.engines.worker import Engine, serve  # noqa: E402

_QUIET = None
FLASH = {"auto": -1, "off": 0, "on": 1}   # LLAMA_FLASH_ATTN_TYPE_*
KV_TYPES = {"f32": 0, "f16": 1}           # GGML_TYPE_*


class Offline:
    """One libllama model; `context(n_ctx, n_seq_max)` (re)creates the context: n_seq_max sequences sharing a
    unified KV cache of n_ctx tokens."""

    def __init__(self, model: str, threads: int, n_ctx: int = 256, n_seq_max: int = 1, kv_type: str = "f16",
                 flash_attn: str = "auto", n_batch: int = 512, quiet: bool = False, mmap: bool = False,
                 extra_bufts: bool = True) -> None:
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
        if mmap:  # llama.cpp's default: the weights stay file pages (what runs a model larger than RAM: the
            mp.load_mode = L.LLAMA_LOAD_MODE_MMAP  # kernel reads them back on a page fault; bench/moe_offload.py)
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = extra_bufts  # False: no repacked / AMX weight buffers (they crash some VMs on Q4_0/Q8_0)
        self.model = L.llama_model_load_from_file(str(model).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model}")
        self.threads, self.kv_type, self.flash_attn, self.n_batch = threads, kv_type, flash_attn, n_batch
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.ctx = None
        self.shape = (0, 0)
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.context(n_ctx, n_seq_max)

    def context(self, n_ctx: int, n_seq_max: int) -> None:
        """A fresh context with room for n_ctx tokens over n_seq_max sequences (kept if it is already that)."""
        L = self.L
        n_ctx = max(256, -(-n_ctx // 256) * 256)
        if self.ctx is not None and self.shape == (n_ctx, n_seq_max):
            self.clear()
            return
        if self.ctx is not None:
            L.llama_free(self.ctx)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, self.n_batch, self.n_batch, n_seq_max
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.type_k = cp.type_v = KV_TYPES[self.kv_type]
        cp.flash_attn_type = FLASH[self.flash_attn]
        cp.kv_unified = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens, {n_seq_max} sequences")
        self.shape = (n_ctx, n_seq_max)

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

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
        """Greedy, every prompt prefilled then all sequences decoded together (one batch entry per unfinished
        sequence per step), no stop on end-of-sequence; sequence i stops after max_tokens[i] tokens."""
        self.clear()
        out = [[t] for t in self.prefill(prompts)]
        for step in range(1, max(max_tokens)):
            live = [s for s in range(len(prompts)) if len(out[s]) < max_tokens[s]]
            for k in range(0, len(live), self.n_batch):
                chunk = live[k:k + self.n_batch]
                self._decode([(out[s][-1], len(prompts[s]) + step - 1, s, True) for s in chunk])
                for i, s in enumerate(chunk):
                    out[s].append(self._argmax(i))
        return out


class LlamaCppEngine(Engine):
    """The worker's engine: options model (GGUF), dtype (picks the KV type: f32 for float32, else f16),
    threads, and optionally kv_type, flash_attn, n_batch, mmap (map the GGUF instead of reading it into RAM)."""

    def __init__(self, model: str, dtype: str, threads: int, kv_type: str | None = None, flash_attn: str = "auto",
                 n_batch: int = 512, quiet: bool = True, mmap: bool = False, extra_bufts: bool = True,
                 **_ignored) -> None:
        kv_type = kv_type or ("f32" if dtype == "float32" else "f16")
        self.llm = Offline(model, threads, kv_type=kv_type, flash_attn=flash_attn, n_batch=n_batch, quiet=quiet,
                           mmap=mmap, extra_bufts=extra_bufts)

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> dict:
        self.llm.context(sum(len(p) for p in prompts) + sum(max_tokens) + 16, len(prompts))
        t = time.perf_counter()
        out = self.llm.generate(prompts, max_tokens)
        seconds, n = time.perf_counter() - t, sum(len(o) for o in out)
        return {"seconds": seconds, "output_tokens": n, "tok_s": n / seconds}

    def greedy(self, prompts: list[list[int]], max_tokens: int, logprobs: int = 5) -> dict:
        """One prompt at a time, with the top-k logprobs at every step."""
        llm = self.llm
        llm.context(max(len(p) for p in prompts) + max_tokens + 16, 1)
        token_ids, lps = [], []
        for p in prompts:
            llm.clear()
            llm.prefill([p])
            tops = [llm.top_logprobs(-1, logprobs)]
            out = [tops[0][0][0]]
            for step in range(1, max_tokens):
                llm._decode([(out[-1], len(p) + step - 1, 0, True)])
                tops.append(llm.top_logprobs(-1, logprobs))
                out.append(tops[-1][0][0])
            token_ids.append(out)
            lps.append(tops)
        return {"token_ids": token_ids, "logprobs": lps}


def smoke() -> None:
    """Every op on the tiny float32 GGUFs, 1 thread (the batched greedy tokens should equal one-at-a-time ones)."""
    gguf_dir = Path(__file__).resolve().parents[1] / ".cache" / "gguf"
    models = sorted(gguf_dir.glob("tiny-*-f32.gguf"))
    if not models:
        raise SystemExit("no tiny GGUF: run `.venv/bin/python bench/engines/llamacpp_engine.py --smoke` from the main venv")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 32000, size=n).tolist() for n in (5, 9, 17)]
    for m in models:
        eng = LlamaCppEngine(str(m), "float32", 1, flash_attn="off")
        one = eng.greedy(prompts, 8)["token_ids"]
        eng.llm.context(256, len(prompts))
        together = eng.llm.generate(prompts, [8] * len(prompts))
        print(f"{m.name}: greedy {one[0]}; batched == one at a time: {together == one}")
        print(f"{m.name}: decode {eng.decode(prompts[0], 16)['tok_s']:.0f} tok/s, "
              f"prefill {eng.prefill(prompts[2] * 8)['tok_s']:.0f} tok/s, "
              f"batched {eng.generate(prompts, [8, 4, 2])['output_tokens']} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help="serve bench/engines/worker.py ops on stdin/stdout")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:  # the main venv: build the tiny GGUFs here, run the ops in the peers venv
            from bench.peers.env import peer_python
            from bench.peers.gguf_export import ensure
            from bench.models import TINY, build
            for shape in TINY:
                ensure(build(shape), "f32")
            subprocess.run([peer_python(), __file__, "--smoke"], check=True)
            return
        smoke()
    elif args.worker:
        serve(LlamaCppEngine)
    else:
        ap.error("--worker or --smoke")


if __name__ == "__main__":
    main()

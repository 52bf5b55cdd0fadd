"""The configurations `python -m bench speculative` compares, behind one interface: `generate(prompt ids) ->
generated ids` for a round of concurrent prompts, and `spec_counts()` (draft tokens proposed, accepted so far).

- `FerryConfig`: one in-process `ferry.LLM` on ferry-tiny, without speculation or with one method.
- `LlamaCppConfig`: one `llama-server` on the same checkpoints converted to GGUF (bench/peers/gguf_export.py), at
  the same precision, without speculation, with its draft model (`--spec-type draft-simple -md`, ferry-tiny-draft)
  or with its n-gram lookup (`--spec-type ngram-simple`); prompts go in as token ids (`/completion`), tokens come
  back with `return_tokens`, acceptance from each response's `timings.draft_n` / `draft_n_accepted`."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "ferry" / "assets"
FERRY_METHODS = ("plain", "ngram", "phrase", "draft")
LLAMACPP_MODES = {"llama.cpp": [], "llama.cpp-ngram": ["--spec-type", "ngram-simple"], "llama.cpp-draft": None}
GGUF_TYPES = {"float32": ("f32", "f32"), "bfloat16": ("bf16", "bf16")}  # dtype -> (outtype, KV cache type)


class FerryConfig:
    def __init__(self, method: str, dtype: str, threads: int, k: int | None, model: Path = ASSETS / "ferry-tiny",
                 **options) -> None:
        """options: more LLM(...) keywords (the MoE part: expert_store, expert_cache_memory)."""
        from ferry import LLM
        opts: dict = dict(kv_cache_memory="256M", threads=threads, dtype=dtype, **options)
        if method != "plain":
            opts.update(speculative_method=method, num_speculative_tokens=k or "auto")
        if method == "draft":
            opts["speculative_model"] = str(ASSETS / "ferry-tiny-draft")
        self.llm = LLM(str(model), **opts)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        from ferry import SamplingParams
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def spec_counts(self) -> tuple[int, int] | None:
        s = self.llm.view().speculative
        return None if s is None else (s["num_draft_tokens"], s["num_accepted_tokens"])

    def expert_counts(self) -> tuple[int, int, int] | None:
        """(bytes read from the expert store, expert lookups, hits) so far; None without a store."""
        e = self.llm.view().experts
        return None if e is None else (e.bytes_read, e.lookups, e.hits)

    def close(self) -> None:
        pass


class LlamaCppConfig:
    def __init__(self, name: str, dtype: str, threads: int, slots: int, k: int | None) -> None:
        from bench.peers import gguf_export, servers
        outtype, kv = GGUF_TYPES[dtype]
        extra = LLAMACPP_MODES[name]
        if extra is None:  # the draft model, its KV at the same precision
            extra = ["--spec-type", "draft-simple", "-md", str(gguf_export.ensure(ASSETS / "ferry-tiny-draft", outtype)),
                     "-ctkd", kv, "-ctvd", kv]
        if name != "llama.cpp" and k:
            extra += ["--spec-draft-n-max", str(k)]
        self.server = servers.llama_server(gguf_export.ensure(ASSETS / "ferry-tiny", outtype), threads, slots, 2048,
                                           kv_type=kv, extra_args=extra).start()
        self.spec = name != "llama.cpp"
        self.drafted = self.accepted = 0
        self._pool = ThreadPoolExecutor(slots)

    def _one(self, ids: list[int], max_tokens: int) -> list[int]:
        r = httpx.post(self.server.url + "/completion", timeout=600,
                       json={"prompt": ids, "n_predict": max_tokens, "temperature": 0, "ignore_eos": True,
                             "return_tokens": True, "cache_prompt": False})
        r.raise_for_status()
        body = r.json()
        timings = body.get("timings", {})
        self.drafted += timings.get("draft_n", 0)
        self.accepted += timings.get("draft_n_accepted", 0)
        return body["tokens"]

    def generate(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        return list(self._pool.map(lambda p: self._one(p, max_tokens), prompts))

    def spec_counts(self) -> tuple[int, int] | None:
        return (self.drafted, self.accepted) if self.spec else None

    def close(self) -> None:
        self._pool.shutdown()
        self.server.stop()


def build(name: str, dtype: str, threads: int, slots: int, k: int | None) -> FerryConfig | LlamaCppConfig:
    if name in FERRY_METHODS:
        return FerryConfig(name, dtype, threads, k)
    if name in LLAMACPP_MODES:
        return LlamaCppConfig(name, dtype, threads, slots, k)
    raise SystemExit(f"unknown configuration {name!r}; choose from {', '.join(FERRY_METHODS + tuple(LLAMACPP_MODES))}")

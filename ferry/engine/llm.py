"""The offline Python API, as vLLM's: LLM(path).generate(prompts, SamplingParams(...))."""
from __future__ import annotations

import itertools
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from ferry.engine.engine import LLMEngine
from ferry.engine.inputs import PromptInput, sampling_params
from ferry.engine.options import engine_config
from ferry.engine.view import EngineView
from ferry.request import RequestOutput, SamplingParams


class LLM:
    """Keywords are the engine options (the CLI flags with underscores), e.g. LLM(path, kv_cache_memory="512M")."""

    def __init__(self, model: str, **options: Any) -> None:
        self.engine = LLMEngine.from_config(engine_config(model, **options))
        self._ids = itertools.count()

    def close(self) -> None:
        """Free what the engine holds beyond Python objects (the expert cache and its reader threads)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call that passes no SamplingParams samples with: the checkpoint's generation_config.json
        (temperature, top_p, top_k, repetition_penalty) over SamplingParams' own defaults, as in vLLM."""
        return sampling_params({}, self.engine.inputs.sampling_defaults)

    def _add(self, prompts: PromptInput | Sequence[PromptInput],
             params: SamplingParams | Sequence[SamplingParams] | None) -> list[str]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, (list, tuple)) else [params or self.get_default_sampling_params()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params_list):
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
        except Exception:
            for rid in ids:  # all or nothing
                self.engine.abort_request(rid)
            raise
        return ids

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order."""
        ids = self._add(prompts, sampling_params)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=None if use_tqdm else True, leave=False) as bar:
            for out in self._run(set(ids)):
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        return [done[i] for i in ids]

    def stream(self, prompts: PromptInput | Sequence[PromptInput],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[RequestOutput]:
        """Yields cumulative RequestOutputs as tokens arrive (every request's last one has finished=True).
        Leaving the loop early aborts the requests still running."""
        ids = set(self._add(prompts, sampling_params))
        yield from self._run(ids)

    def _run(self, ids: set[str]) -> Iterator[RequestOutput]:
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in ids:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for rid in pending:
                self.engine.abort_request(rid)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        return self.generate([{"messages": messages}], sampling_params, use_tqdm=False)[0]

    def view(self) -> EngineView:
        """What the engine holds now (KV blocks, running requests...): a read-only snapshot."""
        return self.engine.view()

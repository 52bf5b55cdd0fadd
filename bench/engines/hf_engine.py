"""Hugging Face transformers `generate` in a worker process (bench/engines/worker.py), on the same safetensors.

Offline jobs run the way a transformers user batches: requests sorted by prompt length, static batches of
`batch_size` (left-padded), each batch generating the longest output any of its requests asked for; only the
asked-for tokens count as output. Greedy, end-of-sequence disabled (min_new_tokens = max_new_tokens).

With max_cpu_memory and offload_folder it is what a user short of RAM would try: accelerate's big-model
loading (`device_map="auto"`, `max_memory={"cpu": ...}`, `offload_folder`), which keeps whole modules in RAM up
to that size and puts the rest on disk, reading their weights back at every forward."""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.engines.worker import Engine, serve


class HFEngine(Engine):
    """options: model, dtype, threads, batch_size (static batch of offline jobs, default 16), and for disk
    offload max_cpu_memory (bytes of weights accelerate may keep in RAM) with offload_folder."""

    def __init__(self, model: str, dtype: str, threads: int, batch_size: int = 16, max_cpu_memory: int | None = None,
                 offload_folder: str | None = None, **_ignored) -> None:
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(threads)
        self.torch = torch
        self.batch_size = batch_size
        offload = {} if max_cpu_memory is None else dict(device_map="auto", max_memory={"cpu": max_cpu_memory},
                                                          offload_folder=offload_folder)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype),
                                                          local_files_only=True, **offload).eval()

    def placement(self) -> dict:
        """Where accelerate put the modules: {"cpu": n, "disk": n} counts of device_map entries, and the map."""
        dm = getattr(self.model, "hf_device_map", None) or {"": "cpu"}
        counts: dict[str, int] = {}
        for dev in dm.values():
            counts[str(dev)] = counts.get(str(dev), 0) + 1
        return {"counts": counts, "device_map": {k: str(v) for k, v in dm.items()}}

    def _batch(self, prompts: list[list[int]], max_new: int, **kw):
        torch = self.torch
        L = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            return self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                       min_new_tokens=max_new, do_sample=False, pad_token_id=0, **kw), L

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> dict:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        t = time.perf_counter()
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            self._batch([prompts[i] for i in idx], max(max_tokens[i] for i in idx))
        seconds = time.perf_counter() - t
        return {"seconds": seconds, "output_tokens": sum(max_tokens), "tok_s": sum(max_tokens) / seconds}

    def greedy(self, prompts: list[list[int]], max_tokens: int, logprobs: int = 5) -> dict:
        ids, lps = [], []
        for p in prompts:
            out, L = self._batch([p], max_tokens, output_logits=True, return_dict_in_generate=True)
            ids.append(out.sequences[0, L:].tolist())
            steps = []
            for logits in out.logits:
                lp = self.torch.log_softmax(logits[0].double(), -1)
                top = lp.topk(logprobs)
                steps.append(list(zip(top.indices.tolist(), top.values.tolist())))
            lps.append(steps)
        return {"token_ids": ids, "logprobs": lps}


if __name__ == "__main__":
    serve(HFEngine)

"""Token sampling: logits -> token ids (+ logprobs)."""
from ferry.sampling.sampler import Sampler

__all__ = ["Sampler"]

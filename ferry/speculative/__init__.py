"""Speculative decoding, the scheduler's half (torch-free): who proposes draft tokens (`ngram`: prompt lookup,
`phrase`: a pool of phrases kept across requests, `draft`: a small model behind the same `Proposer` port, built by
the engine), how many a request gets per step (`adaptive.py`), and the acceptance statistics. Verification is the
runner's (ferry/runner/verify.py): the draft tokens travel in the plan."""
from ferry.speculative.base import Proposer, SpecStats
from ferry.speculative.speculator import Speculator

__all__ = ["Proposer", "SpecStats", "Speculator"]

"""`python -m bench speculative --smoke` (ferry only, ~1 min): every configuration gives the tokens of plain
decoding, and the MoE part reads experts from its store and reports what verification costs in reads."""
from __future__ import annotations

import json

from bench.speculative import main
from tests.e2e.conftest import REPO_ROOT


def test_speculative_smoke_records_equivalence_and_expert_reads():
    main(["--smoke", "--methods", "plain,ngram,phrase"])
    record = json.loads((REPO_ROOT / "bench/.cache/smoke/speculative.json").read_text())
    for case in record["cases"] + record["moe"]["cases"]:
        assert set(case["engines"]) == {"plain", "ngram", "phrase"}
        assert all(e["equivalence"] == 1.0 for e in case["engines"].values()), case  # greedy: exact
    for e in record["moe"]["cases"][0]["engines"].values():
        assert e["expert_bytes_per_token"] > 0 and 0 <= e["expert_hit_rate"] <= 1

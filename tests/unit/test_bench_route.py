"""bench/route.py's parts without models: the router fit on synthetic divergence labels, the plot from a record;
and the --smoke run end to end on the in-house pair (tests/engine would be its tier, but it is the scenario's own
check: the record has every configuration, the endpoints are the two models)."""
from __future__ import annotations

import json
import math
import random

import pytest

from ferry.ops import gemv


def test_fit_learns_that_confident_tokens_diverge_less():
    from ferry.engine.route_calibrate import Samples, fit
    from ferry.speculative.route import features
    rng = random.Random(0)
    samples = Samples([], [])
    for _ in range(2000):
        p1 = rng.uniform(0.05, 0.99)
        samples.feats.append(features([math.log(p1)]))
        samples.divergent.append(rng.random() > p1)  # diverges with chance 1 - p1
    router = fit(samples)
    assert router.kind == "logistic" and router.info["positions"] == 2000
    assert router.score((0.95, 0.9, 0.2)) < 0.25 < 0.75 < router.score((0.1, 0.05, 2.5))
    with pytest.raises(ValueError, match="both divergent and agreeing"):
        fit(Samples([(0.5, 0.1, 1.0)] * 20, [True] * 20))


def test_plot_from_a_record(tmp_path):
    from bench.route import plot
    def entry(frac, agree):
        return {"median": 10.0, "min": 9.0, "max": 11.0, "large_fraction": frac, "agreement": agree}
    record = {"cases": [{"concurrency": 1,
                         "engines": {"large": entry(1.0, 1.0), "small": entry(0.0, 0.7),
                                     "route@0": entry(1.0, 1.0), "route@0.7": entry(0.4, 0.9)},
                         "ratios": {"small": {"median": 2.0}, "route@0": {"median": 0.8},
                                    "route@0.7": {"median": 1.3}}}]}
    plot(record, tmp_path / "route.png")
    assert (tmp_path / "route.png").stat().st_size > 0


@pytest.mark.skipif(not gemv.available(), reason="the endpoints are exact where ferry/ops/gemv runs")
def test_smoke_run_records_every_threshold_and_the_endpoints(tmp_path):
    from bench.common import result_path
    from bench.route import main
    main(["--smoke", "--router-out", str(tmp_path / "router.json")])
    record = json.loads(result_path("route", True).read_text())
    assert json.loads((tmp_path / "router.json").read_text())["kind"] == "logistic"
    for case in record["cases"]:
        e = case["engines"]
        assert set(e) == {"large", "small", "route@0", "route@0.7", "route@1"}
        assert e["route@0"]["large_fraction"] == 1.0 and e["route@0"]["exact"] == 1.0
        assert e["route@0"]["agreement"] == 1.0 and e["large"]["agreement"] == 1.0
        assert e["route@1"]["large_fraction"] == 0.0 and 0.0 <= e["route@1"]["agreement"] <= 1.0
    assert record["retrieval"]["route@0"] == record["retrieval"]["large"]

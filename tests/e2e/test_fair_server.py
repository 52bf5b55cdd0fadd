"""`ferry serve --scheduling-policy fair`: the OpenAI body's `user` reaches the engine as the client, and /metrics
shows each client's share of the tokens served (labels bounded: 8 names + "other")."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def test_user_shares_appear_in_metrics(start_server):
    server = start_server("--scheduling-policy", "fair", "--max-num-seqs", "2")
    for user in ("alice", "bob", "alice"):
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"prompt": "Once upon a time", "max_tokens": 6, "ignore_eos": True, "user": user})
        assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text
    server.wait_idle()
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=30).text)}
    shares = {s.labels["client"]: s.value for s in families["ferry_client_token_share"].samples}
    assert set(shares) == {"alice", "bob", "-"}, shares  # "-": requests without a user
    assert shares["alice"] > shares["bob"] > 0 and abs(sum(shares.values()) - 1) < 1e-6
    assert families["ferry_num_fair_preemptions"].type == "counter"

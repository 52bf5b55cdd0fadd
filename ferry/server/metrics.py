"""/metrics: Prometheus text from a registry of our own (never prometheus_client's global one, so two apps in
one process — tests — do not collide).

Engine-side numbers (queues, KV blocks, prefix cache, preemptions, token counts) are read from
AsyncLLM.stats() at scrape time by a collector; per-request latencies are observed by the server as
requests finish."""
from __future__ import annotations

import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ferry.engine.stats import Durations, EngineStats, MigrationStats
from ferry.request import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 10.0)


class EngineCollector(Collector):
    """Gauges and counters read from the engine's stats snapshot at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._labels = {"model_name": model_name}

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        names, values = list(self._labels), list(self._labels.values())

        def gauge(name: str, doc: str, value: float, extra: dict[str, str] | None = None) -> GaugeMetricFamily:
            extra = extra or {}
            g = GaugeMetricFamily(name, doc, labels=names + list(extra))
            g.add_metric(values + list(extra.values()), value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        yield gauge("ferry_num_requests_running", "Requests holding KV blocks (being computed).", s.num_running)
        yield gauge("ferry_num_requests_waiting", "Requests queued for admission (new or preempted).", s.num_waiting)
        yield gauge("ferry_kv_blocks_used", "KV cache blocks held by requests.", s.num_kv_blocks_used)
        yield gauge("ferry_kv_blocks_total", "KV cache blocks in the pool.", s.num_kv_blocks_total)
        yield gauge("ferry_kv_cache_usage_ratio", "Fraction of KV blocks held by requests.",
                    s.num_kv_blocks_used / s.num_kv_blocks_total if s.num_kv_blocks_total else 0.0)
        yield gauge("ferry_kv_cache_bytes", "Fast-tier bytes the KV policy holds (blocks, scales, index).",
                    s.kv_cache_bytes)
        yield gauge("ferry_kv_host_bytes", "Slow-tier (host) bytes the KV policy holds.", s.kv_host_bytes)
        yield counter("ferry_kv_blocks_offloaded", "KV blocks a policy moved to the slow tier.", s.num_kv_blocks_offloaded)
        yield gauge("ferry_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up.",
                    s.prefix_cache_hit_rate)
        yield counter("ferry_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("ferry_prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield counter("ferry_num_preemptions", "Requests preempted (KV recomputed or swapped).", s.num_preemptions)
        if s.client_token_shares is not None:
            yield from _fair_metrics(s, names, values, counter)
        yield counter("ferry_prompt_tokens", "Prompt tokens admitted.", s.num_prompt_tokens)
        yield counter("ferry_generation_tokens", "Tokens generated.", s.num_generation_tokens)
        yield counter("ferry_engine_steps", "Engine steps run.", s.num_steps)
        yield gauge("ferry_decode_weight_bytes_per_second", "Weight bytes a decode step reads / its forward time "
                    "(moving average over decode-only steps): the achieved weight bandwidth, 0 before any decode.",
                    s.decode_weight_bytes_per_s)
        if s.experts is not None:
            yield from _expert_metrics(s, gauge, counter)
        if s.speculative is not None:
            yield from _speculative_metrics(s.speculative, gauge, counter)
        if s.instances is not None:
            yield from _instance_metrics(s.instances, names, values)
        if s.migrations is not None:
            yield from _migration_metrics(s.migrations, names, values)


def _migration_metrics(m: MigrationStats, names: list[str], values: list[str]) -> Iterator[Metric]:
    """Live migrations between instances: outcomes, blocks copied, the stop-and-copy pause and the downtime."""
    outcomes = CounterMetricFamily("ferry_migrations", "Live migrations, by outcome (migrated, aborted_src: the "
                                   "request ended or could not move, aborted_dst: the destination failed).",
                                   labels=names + ["outcome"])
    for outcome in ("migrated", "aborted_src", "aborted_dst"):
        outcomes.add_metric(values + [outcome], m.outcomes.get(outcome, 0))
    yield outcomes
    blocks = CounterMetricFamily("ferry_migration_blocks", "KV blocks copied by completed migrations.", labels=names)
    blocks.add_metric(values, m.num_blocks)
    yield blocks
    yield _histogram("ferry_migration_pause_seconds", "Stop-and-copy: from the source stopping the request until it "
                     "runs on the destination.", m.pause, names, values)
    yield _histogram("ferry_migration_downtime_seconds", "The source stopping the request to its first token from "
                     "the destination.", m.downtime, names, values)


def _histogram(name: str, doc: str, d: Durations, names: list[str], values: list[str]) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=names)
    cumulative, running = [], 0
    for bound, count in zip([*map(str, d.buckets), "+Inf"], d.counts):
        running += count
        cumulative.append((bound, running))
    h.add_metric(values, cumulative, d.total)
    return h


def _instance_metrics(loads: list, names: list[str], values: list[str]) -> Iterator[Metric]:
    """ferry serve --instances N: each instance's state and load, as the front end sees them."""
    families = [GaugeMetricFamily("ferry_instance_alive", "1 while the engine instance runs, 0 while it restarts.",
                                  labels=names + ["instance"]),
                GaugeMetricFamily("ferry_instance_requests_in_flight", "Requests the front end has on the instance.",
                                  labels=names + ["instance"]),
                CounterMetricFamily("ferry_instance_restarts", "Times the instance died and was started again.",
                                    labels=names + ["instance"])]
    for load in loads:
        for family, v in zip(families, (float(load.alive), load.in_flight, load.restarts)):
            family.add_metric(values + [str(load.index)], v)
    yield from families


def _fair_metrics(s: EngineStats, names: list[str], values: list[str], counter: Callable) -> Iterator[Metric]:
    """--scheduling-policy fair: each client's share of the tokens served over the window (the 8 most-served clients
    by `user`, "-" for none, the rest summed as "other": the label set stays bounded whatever clients send)."""
    yield counter("ferry_num_fair_preemptions", "Requests preempted to give a waiting client its share.",
                  s.num_fair_preemptions)
    family = GaugeMetricFamily("ferry_client_token_share", "Share of the tokens served over the fairness window, by "
                               "client (request `user`).", labels=names + ["client"])
    for client, share in s.client_token_shares.items():
        family.add_metric(values + [client], share)
    yield family


def _speculative_metrics(spec: dict, gauge: Callable, counter: Callable) -> Iterator[Metric]:
    """Speculative decoding (--speculative-method): drafts verified and accepted, per the method in use."""
    yield counter("ferry_spec_decode_draft_tokens", f"Draft tokens verified ({spec['method']}).", spec["num_draft_tokens"])
    yield counter("ferry_spec_decode_accepted_tokens", f"Draft tokens accepted ({spec['method']}).",
                  spec["num_accepted_tokens"])
    yield gauge("ferry_spec_decode_acceptance_rate", "Accepted / verified draft tokens.", spec["acceptance_rate"])
    yield gauge("ferry_spec_decode_mean_accepted_length", "Tokens a verifying request gains per step (accepted + 1).",
                spec["mean_accepted_length"])
    if "large_fraction" in spec:  # route (R2R): who produced the tokens
        yield counter("ferry_route_small_tokens", "Tokens the small model produced and the router kept.",
                      spec["num_small_tokens"])
        yield counter("ferry_route_large_tokens", "Tokens the router sent to the model.", spec["num_large_tokens"])
        yield gauge("ferry_route_large_fraction", "Tokens the model produced / all routed tokens.",
                    spec["large_fraction"])


def _expert_metrics(s: EngineStats, gauge: Callable, counter: Callable) -> Iterator[Metric]:
    """MoE expert store (--expert-store): cache, prefetch and disk I/O."""
    e = s.experts
    yield gauge("ferry_expert_cache_hit_rate", "Experts found in RAM (or already being prefetched) / needed.", e.hit_rate)
    yield counter("ferry_expert_cache_lookups", "Experts needed by MoE layers.", e.lookups)
    yield counter("ferry_expert_cache_hits", "Experts needed and found in the RAM cache.", e.hits)
    yield gauge("ferry_expert_cache_bytes", "RAM held for cached experts (never above the budget).", e.cache_nbytes)
    yield gauge("ferry_expert_prefetch_precision", "Predicted experts the layer used / predicted.", e.prefetch_precision)
    yield gauge("ferry_expert_prefetch_recall", "Used experts that were predicted / used.", e.prefetch_recall)
    yield counter("ferry_expert_bytes_read", "Expert bytes read from disk.", e.bytes_read)
    yield gauge("ferry_expert_bytes_read_per_token", "Expert bytes read from disk per generated token.",
                e.bytes_read / s.num_generation_tokens if s.num_generation_tokens else 0.0)
    yield counter("ferry_expert_io_stall_seconds", "Time forwards waited for expert reads.", e.stall_seconds)
    yield gauge("ferry_expert_io_stall_seconds_per_token", "Time waiting for expert reads per generated token.",
                e.stall_seconds / s.num_generation_tokens if s.num_generation_tokens else 0.0)
    yield counter("ferry_expert_offload_switches", "Times --expert-eviction/--expert-prefetch auto changed the "
                  "setting in force (the log says why).", e.num_offload_switches)
    if e.offload_setting:
        yield gauge("ferry_expert_offload_setting_info", "The offload setting in force (eviction+prefetch), 1.", 1,
                    {"setting": e.offload_setting})


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineCollector(stats, model_name))
        labels = ["model_name"]
        self._model = model_name
        self.ttft = Histogram("ferry_time_to_first_token_seconds", "Time from arrival to the first token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("ferry_time_per_output_token_seconds", "Mean time between output tokens of a request.",
                              labels, buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("ferry_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.finished = Counter("ferry_request_success", "Requests finished, by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self.responses = Counter("ferry_http_responses", "HTTP responses, by status code.",
                                 ["status"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def clock(self) -> "RequestClock":
        return RequestClock(self)

    def count_aborts(self, num_requests: int) -> None:
        """Choices whose client went away (or that were cut short) before they finished: counted per choice, as
        finished ones are (n=2 is 2). A client that leaves after its last token was produced, or before its
        prompt reached the engine (while tokenizing; refused with 429), aborted nothing: so this counter may
        read a little under the number of client disconnects (issue 23: 90 for 92)."""
        if num_requests:
            self.finished.labels(self._model, "abort").inc(num_requests)

    def observe(self, arrival: float, first_token: float | None, end: float, out: RequestOutput) -> None:
        m = self._model
        for c in out.outputs:
            self.finished.labels(m, c.finish_reason or "abort").inc()
        if first_token is None:
            return
        self.ttft.labels(m).observe(first_token - arrival)
        self.e2e.labels(m).observe(end - arrival)
        num_tokens = max((len(c.token_ids) for c in out.outputs), default=0)
        if num_tokens > 1:
            self.tpot.labels(m).observe((end - first_token) / (num_tokens - 1))


class RequestClock:
    """Times of one engine request: arrival, first token, end. observe() once it finishes."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.first_token: float | None = None

    def on_output(self, out: RequestOutput) -> None:
        if self.first_token is None and any(c.token_ids for c in out.outputs):
            self.first_token = time.monotonic()
        if out.finished:
            self.metrics.observe(self.arrival, self.first_token, time.monotonic(), out)

"""The web page's cost (issue 24): does a 1 Hz engine-stats client slow decoding, and how much memory does the
page add to an idle server?

Method: one `python -m ferry.server` on the in-house model ferry-tiny (the page on, as shipped). Decode speed is
one streamed chat request at temperature 0 with end-of-sequence ignored, --tokens tokens, timed from its first to
its last token (tok/s); "stats" runs the same request while a client reads /v1/stats/stream (the page's engine
tab, one event a second), "plain" without. The two alternate, the first rotating per round (bench.common
.interleaved), --runs rounds; medians, min/max and the ratio stats/plain go in the JSON. Idle memory: the
server's RSS (/proc) after warm-up with nothing connected, then with the page loaded in a headless chromium
(Playwright, the engine tab open for --idle-seconds) or, without a browser, the page's files fetched and the
stats feed held open by httpx; and again after it disconnects. The feed's own cost, free of decode-speed
noise: the idle server's CPU time per second with and without a stats client (/proc/PID/stat).

    python -m bench webui                 # ~4 min; bench/results/webui.{json,png}
    python -m bench webui --smoke         # a few seconds of decode; bench/.cache/smoke/webui.json
    python -m bench webui --screenshots docs/   # the README's pictures of the page (chat, engine; light, dark)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/webui.py` from the repo root
from bench.common import interleaved, new_record, ratio, result_path, summary

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "ferry" / "assets" / "ferry-tiny"


def decode_tok_s(url: str, tokens: int) -> float:
    """Generated tokens per second of one streamed request, first token to last."""
    body = {"messages": [{"role": "user", "content": "How do I read a file in Python?"}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    first = last = None
    n = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                n = event["usage"]["completion_tokens"]
            elif any(c["delta"].get("content") for c in event.get("choices", [])):
                last = time.perf_counter()
                first = first or last
    return (n - 1) / (last - first) if first and last and last > first and n > 1 else float("nan")


class StatsClient:
    """Reads /v1/stats/stream in a thread, as the page's engine tab does, until closed."""

    def __init__(self, url: str) -> None:
        self.events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        with httpx.stream("GET", url + "/v1/stats/stream", timeout=None) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    self.events += 1
                if self._stop.is_set():
                    return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)


def with_stats(url: str, tokens: int) -> float:
    client = StatsClient(url)
    time.sleep(1.1)  # connected and past its first event
    try:
        return decode_tok_s(url, tokens)
    finally:
        client.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu_ms_per_s(url: str, pid: int, seconds: float, feed: bool) -> float:
    """The idle server's CPU use (ms per wall second), with or without a stats client reading the feed: the
    feed's cost without the decode-speed noise of a shared machine."""
    client = StatsClient(url) if feed else None
    time.sleep(1.2)
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    used = (cpu_seconds(pid) - c0) / (time.monotonic() - t0) * 1000
    if client:
        client.close()
    return used


def page_loaded_rss(url: str, pid: int, seconds: float) -> tuple[float, str]:
    """RSS while the page is open on its engine tab (a browser when there is one, else httpx doing its requests)."""
    try:
        from tests.e2e.test_webui import ARGS, CHROMIUM
        from playwright.sync_api import sync_playwright
    except Exception:  # no Playwright or no chromium (the test module skips at import)
        CHROMIUM = None
    if CHROMIUM:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page()
            page.goto(url + "/#stats")
            page.wait_for_selector("[data-stat='Running']")
            time.sleep(seconds)
            value = rss_mb(pid)
            browser.close()
        return value, "chromium"
    for name in ("", "webui/style.css", "webui/md.js", "webui/api.js", "webui/chat.js", "webui/stats.js"):
        httpx.get(f"{url}/{name}").raise_for_status()
    client = StatsClient(url)
    time.sleep(seconds)
    value = rss_mb(pid)
    client.close()
    return value, "httpx"


def screenshots(folder: Path, threads: int) -> None:
    """docs/webui-{chat,engine}-{light,dark}.png: the page at a laptop size, answering the question issue 24
    asked, with the checkpoint's sampling defaults (the page leaves them unset)."""
    from playwright.sync_api import sync_playwright

    from tests.e2e.conftest import Server
    from tests.e2e.test_webui import ARGS, CHROMIUM
    folder.mkdir(parents=True, exist_ok=True)
    server = Server(MODEL, "--threads", str(threads), "--served-model-name", "ferry-tiny",
                    log_path=folder / ".webui-server.log")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            for scheme in ("light", "dark"):
                page = browser.new_page(viewport={"width": 1000, "height": 620}, color_scheme=scheme)
                page.goto(server.url + "/")
                page.wait_for_selector("#model:not(:empty)")
                page.click("#settings summary")
                page.fill("#max_tokens", "60")
                page.dispatch_event("#max_tokens", "change")
                page.fill("#seed", "7")
                page.dispatch_event("#seed", "change")
                for question in ("How do I read a file in Python?", "What does apt-get do?"):
                    page.fill("#input", question)
                    page.press("#input", "Enter")
                    page.wait_for_selector("#send:not([hidden])", timeout=120_000)
                page.screenshot(path=str(folder / f"webui-chat-{scheme}.png"))
                page.click("#tab-stats")
                body = {"prompt": "The os module provides", "max_tokens": 4000, "ignore_eos": True}
                workers = [threading.Thread(target=httpx.post, args=(server.url + "/v1/completions",),
                                            kwargs={"json": body, "timeout": 300}) for _ in range(3)]
                for i, worker in enumerate(workers):  # staggered: the chart shows the batch growing
                    worker.start()
                    time.sleep(3)
                time.sleep(3)
                page.screenshot(path=str(folder / f"webui-engine-{scheme}.png"))
                for worker in workers:
                    worker.join()
                page.close()
            browser.close()
    finally:
        server.stop()
        (folder / ".webui-server.log").unlink(missing_ok=True)


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = record["decode_tok_s"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    a.bar(["plain", "1 Hz stats client"], [d["plain"]["median"], d["stats"]["median"]], color=["#888", "#1f6feb"])
    a.set_ylabel("decode tok/s (median)")
    a.set_title(f"ratio {record['ratio_stats_over_plain']:.3f}")
    m = record["idle_rss_mb"]
    b.bar(["idle", "page open", "after"], [m["idle"], m["page_open"], m["after"]], color=["#888", "#1f6feb", "#888"])
    b.set_ylabel("server RSS (MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench webui", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    ap.add_argument("--cpu-seconds", type=float, default=10.0, help="window of each idle CPU measurement")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--screenshots", type=Path, default=None, help="only take the README's screenshots into DIR")
    args = ap.parse_args(argv)
    if args.screenshots:
        screenshots(args.screenshots, args.threads)
        return
    if args.smoke:
        args.runs, args.tokens, args.idle_seconds, args.cpu_seconds = 2, 32, 1.5, 1.5
    from tests.e2e.conftest import Server
    out = result_path("webui", args.smoke, args.out)
    server = Server(MODEL, "--threads", str(args.threads), log_path=Path(tempfile.mkdtemp()) / "server.log")
    try:
        pid = server.proc.pid
        time.sleep(1)
        idle = rss_mb(pid)
        open_, how = page_loaded_rss(server.url, pid, args.idle_seconds)
        time.sleep(1.5)
        after = rss_mb(pid)
        cpu = {name: [idle_cpu_ms_per_s(server.url, pid, args.cpu_seconds, name == "stats") for _ in range(2)]
               for name in ("plain", "stats")}
        runs = interleaved({"plain": lambda: decode_tok_s(server.url, args.tokens),
                            "stats": lambda: with_stats(server.url, args.tokens)}, args.runs)
    finally:
        server.stop()
    record = new_record("webui", "does a 1 Hz stats client slow decoding; what does the page add to idle RSS?", args)
    record["decode_tok_s"] = {k: summary(v) for k, v in runs.items()}
    record["ratio_stats_over_plain"] = ratio(record["decode_tok_s"]["stats"]["median"],
                                             record["decode_tok_s"]["plain"]["median"])
    record["ratio_per_round"] = summary([a / b for a, b in zip(runs["stats"], runs["plain"])])  # same round, paired
    record["idle_cpu_ms_per_s"] = {k: summary(v) for k, v in cpu.items()}
    record["idle_rss_mb"] = {"idle": idle, "page_open": open_, "after": after, "page_client": how}
    out.write_text(json.dumps(record, indent=2, default=str))
    plot(record, out.with_suffix(".png"))
    print(json.dumps({k: record[k] for k in ("ratio_stats_over_plain", "ratio_per_round", "idle_cpu_ms_per_s", "idle_rss_mb")}, indent=1))


if __name__ == "__main__":
    main()

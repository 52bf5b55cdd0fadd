"""Slow and stalled clients (issue 23): a request's headers and body each have a read deadline, after which the
socket is closed; SIGTERM is not held by clients that never sent a whole request, and exits 0 without a traceback.
Raw sockets: an HTTP client library would not send half a request."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest

HEADER_TIMEOUT, BODY_TIMEOUT = 1.0, 1.5


@pytest.fixture(scope="module")
def deadline_server(start_server):
    return start_server("--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT))


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes the socket (reads b"" or a reset); fails past `seconds`."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail(f"the server kept the socket open for more than {seconds} s")
    return time.monotonic() - start


def _half_body_request(declared: int = 1000) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode() + b'{"prompt": "a'


def test_silent_connection_closed(deadline_server):
    with _connect(deadline_server) as s:
        assert _closed_within(s, HEADER_TIMEOUT + 5) >= HEADER_TIMEOUT * 0.5


def test_slow_headers_closed(deadline_server):
    """One header byte every 0.1 s: each byte would reset uvicorn's keep-alive timer; the header deadline does not."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with _connect(deadline_server) as s:
        start = time.monotonic()
        with pytest.raises(OSError):
            for byte in request:
                s.sendall(bytes([byte]))
                time.sleep(0.1)
        assert time.monotonic() - start < HEADER_TIMEOUT + 5


def test_half_body_closed_and_engine_idle(deadline_server):
    with _connect(deadline_server) as s:
        s.sendall(_half_body_request())
        elapsed = _closed_within(s, BODY_TIMEOUT + 5)
        assert elapsed >= BODY_TIMEOUT * 0.5
    assert httpx.get(deadline_server.url + "/health", timeout=5).status_code == 200
    m = deadline_server.wait_idle()
    assert m["ferry_num_requests_running"] == 0 and m["ferry_kv_blocks_used"] == 0
    assert 'ferry_http_responses_total{status="500"}' not in m


def test_slow_but_steady_client_within_deadline_is_served(deadline_server):
    body = json.dumps({"prompt": "Lily", "max_tokens": 2}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with _connect(deadline_server) as s:
        s.sendall(head[:10])
        time.sleep(HEADER_TIMEOUT / 3)
        s.sendall(head[10:])
        time.sleep(BODY_TIMEOUT / 3)
        s.sendall(body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]


def test_sigterm_not_held_by_half_requests(start_server):
    """Default deadlines (longer than this test waits): a half-body and a half-header socket are open, and a stream
    is in flight, when SIGTERM comes. The stream completes, the half requests are dropped, the process exits 0
    promptly, and nothing is logged as a traceback or a 500."""
    server = start_server()
    half_body, half_head = _connect(server), _connect(server)
    half_body.sendall(_half_body_request())
    half_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    body = {"prompt": "The storm", "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    started = threading.Event()

    def client() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                started.set()
                lines.append(line)

    t = threading.Thread(target=client)
    t.start()
    assert started.wait(60)
    time.sleep(0.2)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(20)
    took = time.monotonic() - start
    t.join(10)
    half_body.close()
    half_head.close()
    log = server.log()
    assert server.proc.returncode == 0, log
    assert took < 15, (took, log)
    assert "data: [DONE]" in lines
    assert "Traceback" not in log and "CancelledError" not in log and '" 500' not in log, log

"""A recording HTTP proxy in a process of its own: what an upstream really received.

Tests of hybrid routing put it between an edge node and its upstream node. It forwards
each request to ``--target`` and records the method, path, the ``traceparent`` and
``authorization`` headers and the body it received (JSON lines, also at
``GET /_capture/requests``). ``POST /_capture/mode {"delay_s": s, "status": code}`` makes
it answer late, or with an error status instead of forwarding, to stand in for a slow or
failing upstream; ``POST /_capture/clear`` forgets what it recorded.

Usage::

    with CaptureProxy(target=upstream.url, log_path=tmp / "capture.log") as proxy:
        ...  # point a node's --upstream at proxy.url
        bodies = [r["body"] for r in proxy.requests()]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from server.harness.process import LOCALHOST, ManagedProcess, Service, free_port, http_status

RECORDED_HEADERS = ("traceparent", "tracestate", "authorization")


class _State:
    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.delay_s = 0.0
        self.status: int | None = None


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, value: Any) -> None:
            self._reply(status, json.dumps(value).encode(), "application/json")

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self) -> None:
            if self.path == "/_capture/requests":
                with state.lock:
                    self._json(200, list(state.requests))
            elif self.path == "/_capture/ready":
                self._json(200, {"ok": True})
            else:
                self._forward(b"")

        def do_POST(self) -> None:
            body = self._body()
            if self.path == "/_capture/mode":
                mode = json.loads(body or b"{}")
                with state.lock:
                    state.delay_s = float(mode.get("delay_s", 0.0))
                    state.status = mode.get("status")
                self._json(200, {"ok": True})
            elif self.path == "/_capture/clear":
                with state.lock:
                    state.requests.clear()
                self._json(200, {"ok": True})
            else:
                self._forward(body)

        def _forward(self, body: bytes) -> None:
            record = {
                "method": self.command,
                "path": self.path,
                "headers": {h: self.headers.get(h) for h in RECORDED_HEADERS},
                "body": body.decode("utf-8", errors="replace"),
            }
            with state.lock:
                state.requests.append(record)
                delay_s, status = state.delay_s, state.status
            print(json.dumps(record), flush=True)  # the log keeps it too
            if delay_s:
                time.sleep(delay_s)
            if status is not None:
                self._json(int(status), {"detail": "capture proxy: failing on purpose"})
                return
            request = urllib.request.Request(
                state.target + self.path,
                data=body or None,
                method=self.command,
                headers={"Content-Type": self.headers.get("Content-Type") or "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    self._reply(answer.status, answer.read(), answer.headers["Content-Type"])
            except urllib.error.HTTPError as exc:
                self._reply(exc.code, exc.read(), exc.headers["Content-Type"] or "text/plain")

    return Handler


def serve(port: int, target: str) -> None:
    server = ThreadingHTTPServer((LOCALHOST, port), _handler(_State(target)))
    server.daemon_threads = True
    server.serve_forever()


@dataclass
class CaptureProxy(Service):
    """The proxy as a child process on localhost (see the module docstring)."""

    target: str
    log_path: Path
    port: int = field(default_factory=free_port)
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def start(self) -> CaptureProxy:
        cmd = [sys.executable, "-m", "server.harness.capture", "--port", str(self.port),
               "--target", self.target]  # fmt: skip
        self.process = ManagedProcess.start(
            "capture proxy", cmd, env=dict(os.environ), log_path=self.log_path
        )
        self.process.wait_ready(
            lambda: http_status(f"{self.url}/_capture/ready") == 200,
            timeout=60,
            what=f"answering on {self.url}",
        )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            self.process.stop(timeout)

    def requests(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/_capture/requests", timeout=10).json())

    def clear(self) -> None:
        httpx.post(f"{self.url}/_capture/clear", timeout=10).raise_for_status()

    def mode(self, *, delay_s: float = 0.0, status: int | None = None) -> None:
        body = {"delay_s": delay_s, "status": status}
        httpx.post(f"{self.url}/_capture/mode", json=body, timeout=10).raise_for_status()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="record and forward HTTP requests")
    parser.add_argument("--port", type=int, required=True, help="port to listen on")
    parser.add_argument("--target", required=True, help="base URL requests are forwarded to")
    args = parser.parse_args(argv)
    serve(args.port, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())

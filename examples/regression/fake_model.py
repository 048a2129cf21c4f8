"""A deterministic stand-in for a model service, and the command that records reviews.yaml.

``python fake_model.py record`` starts the service on loopback (port 0: the
system picks a free port), runs ``pytest --isobranch-record`` on
test_reviews.agent.yaml with ``FAKE_MODEL_URL`` pointing at it, and stops
it: the cassette beside the case file then holds the model's answers, and
the suite runs offline from then on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rate(text: str) -> dict:
    """The "model": a rating from 1 to 5 and a reason, the same for the same text."""
    words = text.lower()
    if "great" in words or "love" in words:
        return {"rating": 5, "reason": "praise"}
    if "broke" in words or "bad" in words:
        return {"rating": 1, "reason": "complaint"}
    return {"rating": 3, "reason": "neutral"}


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (the http.server name)
        length = int(self.headers.get("Content-Length", 0))
        text = json.loads(self.rfile.read(length) or b"{}").get("text", "")
        body = json.dumps(rate(text)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@contextmanager
def serving() -> Iterator[str]:
    """The service on 127.0.0.1 at a port the system picks; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def record() -> int:
    """Record test_reviews.agent.cassette.json against the service; pytest's exit code."""
    with serving() as url:
        environment = {**os.environ, "FAKE_MODEL_URL": url}
        return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "--isobranch-record", str(HERE / "test_reviews.agent.yaml")],
                               env=environment, cwd=HERE)


if __name__ == "__main__":
    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python fake_model.py record")
    sys.exit(record())

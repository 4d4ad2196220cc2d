"""A local HTTP file server (127.0.0.1, Range requests, scripted failures) in a thread, for the
download tests: never the internet."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Behaviour:
    """What the test server does; ``requests`` records the Range header of every GET, ``paths`` its path."""

    data: bytes = b""
    drops: int = 0  # this many responses stop half way and close the connection
    ignore_range: bool = False
    status: int | None = None  # answer every request with this error status
    send_length: bool = True  # False: no Content-Length header, the body ends when the connection closes
    requests: list = field(default_factory=list)
    paths: list = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        b: Behaviour = self.server.behaviour
        rng = self.headers.get("Range")
        b.requests.append(rng)
        b.paths.append(self.path)
        if b.status:
            self.send_error(b.status)
            return
        start = 0
        if rng and not b.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(b.data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(b.data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(b.data) - 1}/{len(b.data)}")
        else:
            self.send_response(200)
        body = b.data[start:]
        if b.send_length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.close_connection = True
        self.end_headers()
        if b.drops:
            b.drops -= 1
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving() -> Iterator[tuple[Behaviour, str]]:
    """A server answering every path with ``Behaviour.data``; yields (behaviour, http://127.0.0.1:PORT)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.behaviour = Behaviour()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield httpd.behaviour, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def closed_port() -> str:
    """http://127.0.0.1:PORT of a port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"

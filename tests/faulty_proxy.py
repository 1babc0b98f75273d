"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto S3 server.

It forwards every request to the real S3 endpoint, except that on a fixed
schedule it answers ``503 SlowDown`` (what S3 says when throttling) or drops
the connection without answering (a reset mid-request).  The schedule is
deterministic, so a failing test fails the same way twice.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
# What an object in an outage or a burst answers: a server failure, not throttling.  (A SlowDown
# would also make s3fs retry each call 5 times and botocore's adaptive mode slow the
# whole client down, which only makes an outage test slower, not stronger.)
INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultyProxy:
    """Forward to ``upstream``; fault every ``every``-th request of each kind (GET, PUT, LIST, HEAD, ...),
    alternating 503 and a dropped connection, so every kind of call meets both faults.
    ``every=0`` injects nothing: a counting proxy."""

    def __init__(self, upstream: str, every: int = 4):
        self.upstream = urlsplit(upstream)
        self.every = every
        self.requests: Counter[str] = Counter()
        self.paths: Counter[str] = Counter()  # "GET /bucket/key" -> count, query strings dropped
        self.bytes_served: Counter[str] = Counter()  # "GET /bucket/key" -> body bytes relayed
        self.faults: Counter[str] = Counter()  # "GET 503", "PUT drop", ...
        # "GET /bucket/key" entries answered 500 every time, whatever the schedule: an outage of
        # those objects, past every retry.  Tests add and remove entries while the proxy runs.
        self.outage: set[str] = set()
        # "GET /bucket/key" -> how many more requests to it get 500 before it is served: a burst of
        # consecutive server errors on one object.
        self.failures_left: Counter[str] = Counter()
        self.signed: Counter[bool] = Counter()  # requests with / without an Authorization header
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                kind = "LIST" if self.command == "GET" and "list-type" in self.path else self.command
                what = f"{self.command} {self.path.split('?', 1)[0]}"
                proxy._count_path(what)
                with proxy._lock:
                    proxy.signed["Authorization" in self.headers] += 1
                if what in proxy.outage or proxy._take_failure(what):
                    fault = "500"
                else:
                    fault = proxy._next_fault(kind)
                if fault in ("500", "503"):
                    proxy._count(f"{kind} {fault}")
                    body = INTERNAL_ERROR if fault == "500" else SLOW_DOWN
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if fault == "drop":
                    proxy._count(f"{kind} drop")
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    # HEAD answers carry the object's length with no body: relay it as is.
                    if k.lower() not in HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                    with proxy._lock:
                        proxy.bytes_served[what] += len(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _next_fault(self, kind: str) -> str | None:
        with self._lock:
            self.requests[kind] += 1
            n = self.requests[kind]
        if not self.every or n % self.every:
            return None
        return "503" if (n // self.every) % 2 else "drop"

    def _take_failure(self, what: str) -> bool:
        with self._lock:
            if self.failures_left[what] <= 0:
                return False
            self.failures_left[what] -= 1
            return True

    def _count_path(self, what: str) -> None:
        with self._lock:
            self.paths[what] += 1

    def _count(self, what: str) -> None:
        with self._lock:
            self.faults[what] += 1

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

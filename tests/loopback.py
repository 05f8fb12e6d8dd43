"""Tiny servers on 127.0.0.1 that misbehave the way real networks do, for the API and index
clients: one that accepts connections and never answers, one that gives every request the same
answer (a proxy's login page, JSON of another shape, a redirect to itself).
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Silent:
    """Accepts TCP connections (the kernel completes them from the listen backlog) and never
    reads or answers."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def close(self) -> None:
        self.socket.close()


class Same:
    """Answers every request with `status`, `headers` and `body` (JSON-encoded unless bytes);
    `redirect` answers 302 to the very same URL instead (a redirect loop)."""

    def __init__(
        self,
        status: int = 200,
        body=b"",
        headers: dict[str, str] | None = None,
        redirect: bool = False,
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                if redirect:
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(status)
                for key, value in sent.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_PATCH = do_DELETE = do_PUT = do_GET

            def log_message(self, format, *args):  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


LOGIN_PAGE = (
    b"<!DOCTYPE html><html><head><title>Sign in - Corporate Proxy</title></head>"
    b"<body><form>user <input name=u></form></body></html>"
)


class Trickle:
    """Sends a JSON answer's headers at once, then its body one byte every `pause` seconds:
    each read gets something in time, the whole answer never does."""

    def __init__(self, pause: float = 0.2) -> None:
        self.stopping = threading.Event()
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.pause = pause
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            connection, _ = self.socket.accept()
        except OSError:  # closed before any client came
            return
        with connection:
            connection.recv(65536)
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000\r\n\r\n["
            )
            while not self.stopping.wait(self.pause):
                try:
                    connection.sendall(b" ")
                except OSError:  # the client gave up
                    return

    def close(self) -> None:
        self.stopping.set()
        self.socket.close()

"""Servers the remote-shard tests start on 127.0.0.1: moto's S3 server (the real S3 HTTP API,
spoken to by s3fs) and a plain HTTP server with a request log and injectable faults."""

from __future__ import annotations

import os
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class S3Server:
    """``moto[server]`` in a thread; ``env`` is what clients need (endpoint, fake keys)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.env["AWS_ENDPOINT_URL"], key="test", secret="test",
                                 skip_instance_cache=True)

    def stop(self) -> None:
        self.server.stop()


class HttpServer:
    """Serves ``root``; ``log`` lists (status, path) of every GET; ``faults[path]`` is a list of
    actions applied to that path's next GETs, one each: ``"500"``, ``"truncate"`` (the body
    cut in half under the full Content-Length), ``"alter"`` (one byte changed), ``"404"``."""

    def __init__(self, root: Path, delay_s: float = 0.0, rate_bytes_s: float = 0.0) -> None:
        """``delay_s`` before every answer, bodies sent at ``rate_bytes_s`` (0: no limit)."""
        self.root = Path(root)
        self.sent_bytes = 0
        self.log: list[tuple[int, str]] = []
        self.faults: dict[str, list[str]] = {}
        owner = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                time.sleep(delay_s)
                path = owner.root / self.path.split("?")[0].lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.end_headers()

            def do_GET(self) -> None:
                time.sleep(delay_s)
                name = self.path.split("?")[0].lstrip("/")
                queue = owner.faults.get(name)
                action = queue.pop(0) if queue else None
                path = owner.root / name
                if action in ("500", "404") or not path.is_file():
                    status = int(action) if action else 404
                    owner.log.append((status, name))
                    self.send_error(status)
                    return
                data = path.read_bytes()
                if action == "alter":
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                owner.log.append((200, name))
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                body = data[: len(data) // 2] if action == "truncate" else data
                step = 1 << 16
                for i in range(0, len(body), step):
                    self.wfile.write(body[i:i + step])
                    if rate_bytes_s:
                        time.sleep(min(step, len(body) - i) / rate_bytes_s)
                owner.sent_bytes += len(body)
                if action == "truncate":
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def gets(self, name: str, status: int = 200) -> int:
        return sum(1 for s, n in self.log if n == name and s == status)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def set_env(env: dict) -> dict:
    """Set ``env`` in os.environ (spawned ranks inherit it); returns what to restore."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def restore_env(old: dict) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

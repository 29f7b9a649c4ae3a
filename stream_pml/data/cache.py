"""A bounded node-local cache of remote shards (docs/design.md#remote-cache).

Every process of a node shares ``data.cache_dir``. A file arrives once per node, however many
ranks want it: a per-file lock (``flock``) is held while one process downloads, and the others
find the finished file when they get the lock. Downloads are verified (size, sha256) before
they are renamed into place (:func:`shard_tools.remote.download`), so no loader ever opens a
partial or corrupt file.

The cache never holds more than ``data.cache_limit`` bytes: a download first reserves its size
under the node's cache lock, evicting as needed. Each process publishes the shards it will
read next (its *window*: the current one and ``data.prefetch_shards`` more) and the rest of its
epoch; eviction takes least-recently-used files that no local process needs for the rest of
the epoch first, then ones needed later, never a file in a window. A background thread
downloads the window ahead of the reader, so in steady state the loader does not wait on the
network.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from shard_tools.remote import RemoteError, download, filesystem, join

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``200GB``, ``512MiB``, ``1e9`` or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 200GB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class ShardCache:
    def __init__(self, root_url: str, cache_dir: Path, limit_bytes: int, *, retries: int = 4,
                 timeout_s: float = 600.0, options: dict | None = None, window: int = 2):
        self.root = root_url.rstrip("/")
        # One folder per dataset URL: two datasets in one cache never mix files.
        self.dir = Path(cache_dir) / hashlib.sha1(self.root.encode()).hexdigest()[:12]
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "SOURCE").write_text(self.root + "\n")
        self.limit = limit_bytes
        self.retries, self.timeout_s, self.options = retries, timeout_s, options
        self.window = window
        self.expected: dict[str, tuple[int | None, str | None]] = {}  # name -> (size, sha256)
        self.failed: RemoteError | None = None  # a download that stayed unavailable
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-prefetch")
        self._queued: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._needs = self.dir / f".needs-{os.getpid()}-{id(self)}.json"
        self._gave_up: dict[str, RemoteError] = {}  # asked again, the answer is the same
        self._fs = None  # one client for every download of this cache (see download's fs)

    # -- what this process will read ----------------------------------------------------
    def expect(self, name: str, size: int | None, sha256: str | None) -> None:
        self.expected[name] = (size or None, sha256 or None)

    def plan(self, upcoming: list[str], window: int | None = None) -> None:
        """The files this process reads from now to the end of its epoch, in order: the first
        ``window`` (default ``data.prefetch_shards``) + 1 are downloaded in the background now
        and protected from eviction."""
        window = self.window if window is None else window
        with self._lock:  # decode threads hint concurrently
            _atomic_json(self._needs, {"pid": os.getpid(), "window": window, "upcoming": upcoming})
        for name in upcoming[: window + 1]:
            self.prefetch(name)

    def prefetch(self, name: str) -> None:
        with self._lock:
            if name in self._queued or (self.dir / name).exists():
                return
            future = self._pool.submit(self.path, name)
            self._queued[name] = future
        future.add_done_callback(lambda f, n=name: self._done(n, f))

    def _done(self, name: str, future: Future) -> None:
        with self._lock:
            self._queued.pop(name, None)
        exc = future.exception()
        if isinstance(exc, RemoteError) and self.failed is None:
            self.failed = exc

    # -- getting a file ------------------------------------------------------------------
    def path(self, name: str) -> str:
        """Local path of ``name``, downloaded (once per node) if it is not cached."""
        dest = self.dir / name
        try:
            os.utime(dest)  # recently used
            return str(dest)
        except FileNotFoundError:  # not cached (or evicted a moment ago)
            pass
        if name in self._gave_up:
            raise self._gave_up[name]
        with _flock(self.dir / f".{name}.lock"):
            if not dest.exists():  # another process may have fetched it meanwhile
                size, sha = self.expected.get(name, (None, None))
                with self._reserve(name, size):
                    try:
                        download(join(self.root, name), dest, size=size, sha256=sha, retries=self.retries,
                                 timeout_s=self.timeout_s, options=self.options, fs=self._client())
                    except RemoteError as exc:
                        self._gave_up[name] = exc
                        raise
            else:
                os.utime(dest)
        return str(dest)

    def _client(self):
        with self._lock:
            if self._fs is None:
                self._fs = filesystem(self.root, self.options)[0]
            return self._fs

    @contextmanager
    def _reserve(self, name: str, size: int | None):
        need = size or 0
        reservation = self.dir / f".{name}.reserve"
        with _flock(self.dir / ".cache.lock"):
            used = self._used_bytes()
            if used + need > self.limit:
                self._evict(used + need - self.limit, name)
            reservation.write_text(f"{need} {os.getpid()}")
        try:
            yield
        finally:
            # Under the node's lock, so a neighbour's _used_bytes never lists a reservation
            # that is gone when it reads it.
            with _flock(self.dir / ".cache.lock"):
                reservation.unlink(missing_ok=True)

    def _used_bytes(self) -> int:
        """Bytes of cached files and of downloads under way; called under the node's lock."""
        total = 0
        for p in self.dir.iterdir():
            try:
                if p.name.endswith(".reserve"):
                    need, _, pid = p.read_text().partition(" ")
                    if pid and not _alive(int(pid)):  # a killed download reserves nothing
                        p.unlink(missing_ok=True)
                        continue
                    total += int(need or 0)
                elif not p.name.startswith(".") and p.name != "SOURCE":
                    total += p.stat().st_size
            except FileNotFoundError:  # renamed into place or removed meanwhile
                continue
        return total

    def _evict(self, excess: int, incoming: str) -> None:
        window, later = set(), set()
        for needs in self.dir.glob(".needs-*.json"):
            try:
                info = json.loads(needs.read_text())
                if not _alive(info["pid"]):  # a process that ended needs nothing
                    raise ValueError
            except (OSError, ValueError, KeyError):
                needs.unlink(missing_ok=True)
                continue
            window |= set(info["upcoming"][: info["window"] + 1])
            later |= set(info["upcoming"])
        files = [p for p in self.dir.iterdir() if not p.name.startswith(".") and p.name != "SOURCE"
                 and p.name not in window and p.name != incoming]
        # Not needed this epoch by any local process first, then needed later; oldest use first.
        files.sort(key=lambda p: (p.name in later, p.stat().st_mtime))
        for p in files:
            if excess <= 0:
                break
            excess -= p.stat().st_size
            p.unlink()
        if excess > 0:
            raise RemoteError(f"{self.dir}: data.cache_limit={self.limit:,} bytes cannot hold the shards "
                              "the local processes read next; raise data.cache_limit")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._needs.unlink(missing_ok=True)


class CachedShards:
    """List-like: ``paths[k]`` is the local path of ``names[k]`` (fetched when first needed);
    ``hint`` tells the cache which of them come next."""

    def __init__(self, names: list[str], cache: ShardCache):
        self.names, self.cache = names, cache

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, k: int) -> str:
        return self.cache.path(self.names[k])

    def hint(self, upcoming: list[int]) -> None:
        self.cache.plan([self.names[k] for k in upcoming])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def _flock(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)

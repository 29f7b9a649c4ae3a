"""The torch loader reading shards from a remote server through the cache, against local disk.

    python -m bench.remote_bench [--shards data/digits] [--server s3|http] [--delay-ms 50] [--rate-mbs 200]

The server runs in its own process pinned to the last core, as a server on another machine
would not share the loader's cores; the loader (and the local-disk baseline it is compared
with) gets the others. ``s3``: moto's S3 server with the shards uploaded to a bucket, behind a
TCP proxy on 127.0.0.1 that holds every request ``--delay-ms`` and relays answers at
``--rate-mbs`` per connection; ``http``: tests/remote_servers.py's HTTP server with the same
delay and cap. One training epoch of the split (decode and resize to ``--image-size``) is read
from local disk and from the server with ``data.prefetch_shards`` 0, 1, 2 and 4, each with an
empty cache, in this one process; ``--repeats`` rounds of all of them (medians reported).
``--backend dali`` (CPU DALI here): local disk through DALI's reader and through
external_source, and from the server through both: the reader needs the rank's whole epoch
cached before its pipeline is built, external_source reads through the prefetch window. Reports steady-state samples/s (after the first batch) as a
share of local, time to the first batch, and bytes the server sent per epoch. Writes
bench/results/remote-<server>.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
S3_KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def epoch(shards: str, cache_dir: Path, prefetch: int, image_size: int, backend: str = "torch",
          dali_source: str = "auto") -> dict:
    from stream_pml.data.config import DataConfig
    from stream_pml.data.loader import ShardLoader

    cfg = DataConfig(shards=shards, image_size=image_size, batch_size=32, val_split="", test_split="",
                     backend=backend, dali_source=dali_source, cache_dir=str(cache_dir),
                     prefetch_shards=prefetch, cache_limit="50GB")
    t0 = time.perf_counter()
    loader = ShardLoader(cfg)
    stream = loader.train_stream(1)
    first = None
    n = 0
    for batch in stream:
        n += batch.size
        if first is None:
            first = time.perf_counter()
            n_first = n
    end = time.perf_counter()
    if loader.cache is not None:
        loader.cache.close()
    return {"first_batch_s": first - t0, "samples_per_s": (n - n_first) / max(end - first, 1e-9), "samples": n}


async def _proxy(upstream_port: int, delay_s: float, rate: float, sent, ready) -> None:
    """Relays 127.0.0.1 connections to the S3 server: each chunk a client sends (a request) is
    held ``delay_s``; answers go back at ``rate`` bytes/s per connection."""

    async def pipe(reader, writer, hold: float, limit: float, count: bool) -> None:
        due = 0.0  # when the bytes relayed so far may have left at ``limit`` bytes/s
        loop = asyncio.get_running_loop()
        try:
            while chunk := await reader.read(1 << 16):
                if hold:
                    await asyncio.sleep(hold)
                writer.write(chunk)
                await writer.drain()
                if limit:
                    # One sleep per chunk would cost the event loop's timer granularity each
                    # time (TCP hands over ~16 KB pieces): sleep only when ahead of the rate.
                    now = loop.time()
                    due = max(due, now) + len(chunk) / limit
                    if due - now > 0.002:
                        await asyncio.sleep(due - now)
                if count:
                    with sent.get_lock():
                        sent.value += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_r, client_w) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
        await asyncio.gather(pipe(client_r, up_w, delay_s, 0.0, False), pipe(up_r, client_w, 0.0, rate, True))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    ready.put(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def _serve(kind: str, shards: str, delay_s: float, rate: float, sent, ready) -> None:
    """The server process, on the last core."""
    last = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {last})
    if kind == "http":
        sys.path.insert(0, str(REPO))
        from tests.remote_servers import HttpServer

        server = HttpServer(Path(shards).parent, delay_s=delay_s, rate_bytes_s=rate)
        ready.put(f"{server.url}/{Path(shards).name}")
        while True:  # report bytes sent until the parent ends this process
            time.sleep(0.2)
            sent.value = server.sent_bytes
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    os.environ.update(S3_KEYS)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    port = moto.get_host_and_port()[1]
    import boto3

    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    s3.create_bucket(Bucket="bench")
    for path in sorted(Path(shards).iterdir()):
        s3.upload_file(str(path), "bench", f"{Path(shards).name}/{path.name}")
    asyncio.run(_proxy(port, delay_s, rate, sent, _Relay(ready, f"s3://bench/{Path(shards).name}")))


class _Relay:
    """Turns the proxy's port into the URL and endpoint the parent needs."""

    def __init__(self, ready, url: str):
        self.ready, self.url = ready, url

    def put(self, port: int) -> None:
        self.ready.put((self.url, f"http://127.0.0.1:{port}"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=Path, default=REPO / "data/digits")
    ap.add_argument("--server", choices=("s3", "http"), default="s3")
    ap.add_argument("--delay-ms", type=float, default=50)
    ap.add_argument("--rate-mbs", type=float, default=200, help="server bandwidth cap per connection, MB/s")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--backend", choices=("torch", "dali"), default="torch")
    ap.add_argument("--repeats", type=int, default=1, help="runs per row; the median run is reported")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or REPO / "bench/results" / (f"remote-{args.server}" + ("-dali" if args.backend == "dali" else ""))
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs 2 cores: one for the server, the rest for the loader")
    ctx = mp.get_context("spawn")
    sent, ready = ctx.Value("q", 0), ctx.Queue()
    server = ctx.Process(target=_serve, args=(args.server, str(args.shards), args.delay_ms / 1000,
                                              args.rate_mbs * 1e6, sent, ready), daemon=True)
    server.start()
    got = ready.get(timeout=300)
    if args.server == "s3":
        url, endpoint = got
        os.environ.update(S3_KEYS, AWS_ENDPOINT_URL=endpoint)
    else:
        url = got
    os.sched_setaffinity(0, set(cores[:-1]))  # the loader never shares the server's core
    import torch

    torch.set_num_threads(len(cores) - 1)
    # (source, backend label, dali_source, prefetch); the first row is the baseline.
    if args.backend == "torch":
        plan = [("local disk", "torch", "auto", None)] + [(args.server, "torch", "auto", k) for k in (0, 1, 2, 4)]
    else:
        plan = ([("local disk", "dali reader", "reader", None), ("local disk", "dali external", "external", None),
                 (args.server, "dali reader", "reader", 2)]
                + [(args.server, "dali external", "external", k) for k in (0, 1, 2, 4)])
    # Repeats go round the whole plan, so each remote run has a local baseline run minutes
    # apart (this machine's speed drifts by a fifth over an hour); a row's share of local is
    # the median over repeats of its run divided by that repeat's baseline.
    runs: list[list[dict]] = [[] for _ in plan]
    try:
        for _ in range(args.repeats):
            for k, (source, label, dali_source, prefetch) in enumerate(plan):
                before = sent.value
                with tempfile.TemporaryDirectory() as cache:
                    r = epoch(str(args.shards) if prefetch is None else url, Path(cache), prefetch or 0,
                              args.image_size, args.backend, dali_source)
                time.sleep(0.5)  # the http server's count is published every 0.2 s
                runs[k].append({**r, "bytes": sent.value - before})
                print(source, label, prefetch, {key: round(v, 2) for key, v in r.items()}, flush=True)
    finally:
        server.kill()
    rows = []
    for k, (source, label, _, prefetch) in enumerate(plan):
        shares = sorted(r["samples_per_s"] / base["samples_per_s"] for r, base in zip(runs[k], runs[0]))
        mid = sorted(runs[k], key=lambda r: r["samples_per_s"])[len(runs[k]) // 2]
        rows.append({"source": source, "backend": label, "prefetch": "-" if prefetch is None else prefetch, **mid,
                     "share_of_local": shares[len(shares) // 2],
                     "samples_per_s_runs": [r["samples_per_s"] for r in runs[k]]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args) | {"shards": str(args.shards), "out": str(out)},
                                                    "loader_cores": len(cores) - 1, "rows": rows}, indent=1))
    lines = [f"server ({args.server}, own core): {args.delay_ms:g} ms per request, {args.rate_mbs:g} MB/s per "
             f"connection; loader on {len(cores) - 1} core(s); {args.shards}", "",
             f"{args.repeats} round(s) of every row; samples/s: the median run; share: the median over "
              "rounds of the run / the first row's run of the same round", "",
             "| source | loader | prefetch_shards | first batch (s) | samples/s | share of local | runs (samples/s) | MB sent by the server |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['backend']} | {r['prefetch']} | {r['first_batch_s']:.2f} | {r['samples_per_s']:.0f} | "
              f"{100 * r['share_of_local']:.0f} % | {', '.join(f'{x:.0f}' for x in r['samples_per_s_runs'])} | "
              f"{r['bytes'] / 1e6:.1f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"rows": rows}


if __name__ == "__main__":
    main()

"""The torch loader reading shards from a remote server through the cache, against local disk.

    python -m bench.remote_bench [--shards data/digits] [--delay-ms 50] [--rate-mbs 40]

Serves the shard directory over HTTP on 127.0.0.1 with a per-request delay and a bandwidth
cap (tests/remote_servers.py), then iterates one training epoch of the split (decode and
resize included, ``data.image_size`` of the demo) from local disk and from the server with
``data.prefetch_shards`` 0, 1, 2 and 4, each with an empty cache, in this one process.
Reports steady-state samples/s (after the first batch) as a share of local, time to the first
batch, and bytes downloaded per epoch. Writes bench/results/remote.md and .json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def epoch(shards: str, cache_dir: Path, prefetch: int, image_size: int) -> dict:
    from stream_pml.data.config import DataConfig
    from stream_pml.data.loader import ShardLoader

    cfg = DataConfig(shards=shards, image_size=image_size, batch_size=32, val_split="", test_split="",
                     backend="torch", cache_dir=str(cache_dir), prefetch_shards=prefetch, cache_limit="50GB")
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


def main(argv=None) -> dict:
    import sys

    sys.path.insert(0, str(REPO))
    from tests.remote_servers import HttpServer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=Path, default=REPO / "data/digits")
    ap.add_argument("--delay-ms", type=float, default=50)
    ap.add_argument("--rate-mbs", type=float, default=40, help="server bandwidth cap, MB/s")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/remote")
    args = ap.parse_args(argv)
    server = HttpServer(args.shards.parent, delay_s=args.delay_ms / 1000, rate_bytes_s=args.rate_mbs * 1e6)
    url = f"{server.url}/{args.shards.name}"
    rows = []
    try:
        local = epoch(str(args.shards), Path(tempfile.mkdtemp()), 0, args.image_size)
        rows.append({"source": "local disk", "prefetch": "-", **local, "bytes": 0})
        for prefetch in (0, 1, 2, 4):
            before = server.sent_bytes
            with tempfile.TemporaryDirectory() as cache:
                r = epoch(url, Path(cache), prefetch, args.image_size)
            rows.append({"source": "http", "prefetch": prefetch, **r, "bytes": server.sent_bytes - before})
            print(rows[-1], flush=True)
    finally:
        server.stop()
    for r in rows:
        r["share_of_local"] = r["samples_per_s"] / local["samples_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"args": vars(args) | {"shards": str(args.shards),
                                                                             "out": str(args.out)}, "rows": rows}, indent=1))
    lines = [f"server: {args.delay_ms:g} ms per request, {args.rate_mbs:g} MB/s; {args.shards}", "",
             "| source | prefetch_shards | first batch (s) | samples/s | share of local | MB downloaded |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['prefetch']} | {r['first_batch_s']:.2f} | {r['samples_per_s']:.0f} | "
              f"{100 * r['share_of_local']:.0f} % | {r['bytes'] / 1e6:.1f} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"rows": rows}


if __name__ == "__main__":
    main()

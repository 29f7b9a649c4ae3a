"""Shards in object storage and behind HTTP, through the node-local cache, against real servers
on 127.0.0.1: moto's S3 server (spoken to by s3fs) and http.server with injected faults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_pml import checkpoint as ckpt
from stream_pml.data.cache import ShardCache
from stream_pml.train import main as train_main

from .conftest import tiny_overrides
from .ranks import run_ranks
from .remote_servers import HttpServer, S3Server, restore_env, set_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    old = set_env(server.env)
    server.fs().mkdir("bucket")
    yield server
    restore_env(old)
    server.stop()


@pytest.fixture(scope="module")
def s3_digits(s3, digits_shards, tmp_path_factory) -> str:
    """The tiny digits build, uploaded by shard-tools build --out s3://."""
    from shard_tools.cli import main

    stage = tmp_path_factory.mktemp("stage")
    assert main(["build", "digits", "--out", "s3://bucket/digits", "--stage", str(stage), "--num-train", "96",
                 "--num-val", "16", "--num-test", "40", "--shard-size", "24", "--image-size", "32"]) == 0
    return "s3://bucket/digits"


def _final(run: Path) -> tuple[dict, np.ndarray]:
    import zarr

    state = torch.load(ckpt.list_checkpoints(run)[-1] / ckpt.MAIN_FILE, weights_only=False)
    return state["model"], zarr.open_array(str(run / "pseudo_labels.zarr"), mode="r")[:]


def _assert_same(a: Path, b: Path) -> None:
    (model_a, store_a), (model_b, store_b) = _final(a), _final(b)
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert np.array_equal(store_a, store_b)


def test_build_upload_verify_and_an_interrupted_upload_sends_only_the_rest(s3, s3_digits, tmp_path, capsys):
    from shard_tools.cli import main

    capsys.readouterr()
    assert main(["verify", s3_digits]) == 0
    assert capsys.readouterr().out.splitlines()[-4].startswith("0 problems in 7 shards")
    fs = s3.fs()
    # An upload that stopped half way: some objects (and the manifest, sent last) missing.
    for name in ("train-000003.tar", "train-000003.idx", "test.keys.txt", "manifest.json"):
        fs.rm(f"bucket/digits/{name}")
    stage = tmp_path / "stage"
    assert main(["build", "digits", "--out", s3_digits, "--stage", str(stage), "--num-train", "96",
                 "--num-val", "16", "--num-test", "40", "--shard-size", "24", "--image-size", "32"]) == 0
    # A new stage rebuilds locally (same bytes: seeded), but only what differs is uploaded.
    out = capsys.readouterr().out
    assert "uploaded 4 of 22 files" in out, out[out.find("uploaded"):][:80]
    assert main(["verify", s3_digits]) == 0


def test_two_processes_from_s3_equal_the_local_run_also_after_a_kill(s3, s3_digits, digits_shards, tmp_path):
    extra = {"train.epochs": 2, "train.checkpoint_every": 2, "data.cache_limit": "50MB"}
    local, remote, killed = tmp_path / "local", tmp_path / "remote", tmp_path / "killed"
    assert run_ranks(2, tiny_overrides(digits_shards, local, **extra)) == [0, 0]
    remote_argv = lambda run: tiny_overrides(s3_digits, run, **extra, **{"data.cache_dir": tmp_path / f"cache-{run.name}"})  # noqa: E731
    assert run_ranks(2, remote_argv(remote)) == [0, 0]
    _assert_same(local, remote)
    assert run_ranks(2, remote_argv(killed), stop_at=(2, 3)) == [-9, -9]
    assert run_ranks(2, remote_argv(killed)) == [0, 0]
    _assert_same(local, killed)


@pytest.fixture
def http(digits_shards):
    server = HttpServer(digits_shards.parent)
    yield server
    server.stop()


def _http_argv(http, digits_shards, run, cache, **extra):
    return tiny_overrides(f"{http.url}/{digits_shards.name}", run, **{
        "data.cache_dir": cache, "data.download_retries": 3, **extra})


def test_two_ranks_on_a_node_download_each_shard_once(http, digits_shards, tmp_path):
    """Over 2 epochs the ranks swap pieces and shards; the shared cache serves each once."""
    argv = _http_argv(http, digits_shards, tmp_path / "run", tmp_path / "cache", **{"train.epochs": 2})
    assert run_ranks(2, argv) == [0, 0]
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    names = [s["name"] for split in manifest["splits"].values() for s in split["shards"]]
    for name in names:
        assert http.gets(f"{digits_shards.name}/{name}") == 1, (name, http.log)


def test_transient_faults_are_retried_and_the_run_is_unchanged(http, digits_shards, tmp_path):
    reference = tmp_path / "reference"
    assert train_main(tiny_overrides(digits_shards, reference)) == 0
    d = digits_shards.name
    http.faults = {f"{d}/train-000000.tar": ["500", "500"], f"{d}/train-000001.tar": ["truncate"],
                   f"{d}/train-000002.tar": ["alter"], f"{d}/manifest.json": ["500"]}
    run = tmp_path / "run"
    assert train_main(_http_argv(http, digits_shards, run, tmp_path / "cache")) == 0
    assert http.gets(f"{d}/train-000000.tar", 500) == 2 and http.gets(f"{d}/train-000000.tar") == 1
    assert http.gets(f"{d}/train-000001.tar") == 2 and http.gets(f"{d}/train-000002.tar") == 2
    _assert_same(reference, run)


def test_a_shard_that_stays_wrong_or_is_gone_ends_the_run_in_one_line(http, digits_shards, tmp_path, capsys):
    d = digits_shards.name
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert train_main(_http_argv(http, digits_shards, run, cache)) == 0
    kept = ckpt.list_checkpoints(run)
    shutil.rmtree(cache)
    http.faults = {f"{d}/train-000001.tar": ["alter"] * 10}
    capsys.readouterr()
    assert train_main(_http_argv(http, digits_shards, run, cache, **{"train.epochs": 2})) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"data error: {http.url}/{d}/train-000001.tar: unavailable after 4 attempts") and \
        "sha256" in line
    assert ckpt.list_checkpoints(run)[: len(kept)] == kept  # nothing lost
    http.faults = {f"{d}/train-000002.tar": ["404"] * 10}
    shutil.rmtree(cache)
    assert train_main(_http_argv(http, digits_shards, run, cache, **{"train.epochs": 2})) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"data error: {http.url}/{d}/train-000002.tar: FileNotFoundError")
    assert http.gets(f"{d}/train-000002.tar", 404) == 1  # a missing object is not retried
    http.faults = {}
    assert train_main(_http_argv(http, digits_shards, run, cache, **{"train.epochs": 2})) == 0


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_cache_smaller_than_the_dataset_stays_under_its_limit(http, digits_shards, tmp_path, monkeypatch, backend):
    """Also with DALI (fed from the cache through external_source): its reader would need the
    whole epoch's shards cached at once and was refused here."""
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    sizes = [s["size"] for split in manifest["splits"].values() for s in split["shards"]]
    limit = 4 * max(sizes) + 64 * 1024  # the window (3 shards) and a little
    assert limit < sum(sizes)
    real = ShardCache.path
    seen = []

    def path(self, name):
        out = real(self, name)
        seen.append(self._used_bytes())
        assert seen[-1] <= self.limit, f"cache holds {seen[-1]} bytes, limit {self.limit}"
        return out

    monkeypatch.setattr(ShardCache, "path", path)
    d = digits_shards.name
    argv = _http_argv(http, digits_shards, tmp_path / "run", tmp_path / "cache",
                      **{"data.cache_limit": limit, "data.val_split": "''", "data.test_split": "''",
                         "data.backend": backend})
    assert train_main(argv) == 0
    for shard in manifest["splits"]["train"]["shards"]:
        assert http.gets(f"{d}/{shard['name']}") == 1  # one epoch: each shard once
    assert seen


def test_a_cache_limit_below_the_prefetch_window_is_refused_with_the_numbers(http, digits_shards, tmp_path, capsys):
    assert train_main(_http_argv(http, digits_shards, tmp_path / "run", tmp_path / "cache",
                                 **{"data.cache_limit": "10KB"})) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data.cache_limit=10KB (10,000 bytes) cannot hold the prefetch window" in line


def test_evaluate_and_predict_read_a_split_from_s3(s3, s3_digits, digits_shards, tmp_path):
    from stream_pml.cli import main as cli

    run = tmp_path / "run"
    assert train_main(tiny_overrides(digits_shards, run)) == 0
    local, remote = tmp_path / "eval-local", tmp_path / "eval-s3"
    assert cli(["evaluate", "--checkpoint", str(run), "--shards", str(digits_shards), "--out", str(local)]) == 0
    assert cli(["evaluate", "--checkpoint", str(run), "--shards", s3_digits, "--out", str(remote)]) == 0
    (a,), (b,) = local.glob("evaluation_*.json"), remote.glob("evaluation_*.json")
    assert a.name == b.name and json.loads(a.read_text())["map"] == json.loads(b.read_text())["map"]
    out = tmp_path / "p.jsonl"
    assert cli(["predict", "--checkpoint", str(run), "--shards", s3_digits, "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 40


def test_an_upload_replaces_an_object_of_the_same_size_but_other_bytes(s3, tmp_path):
    """Tar shards are padded to 10 KiB records, so a rebuilt shard often keeps its size."""
    from shard_tools.remote import upload_tree

    (tmp_path / "a.tar").write_bytes(b"x" * 10240)
    assert upload_tree(tmp_path, "s3://bucket/same", ["a.tar"]) == ["a.tar"]
    assert upload_tree(tmp_path, "s3://bucket/same", ["a.tar"]) == []
    (tmp_path / "a.tar").write_bytes(b"y" * 10240)
    assert upload_tree(tmp_path, "s3://bucket/same", ["a.tar"]) == ["a.tar"]
    assert s3.fs().cat_file("bucket/same/a.tar") == b"y" * 10240


def test_caches_sharing_a_directory_count_each_others_downloads_safely(digits_shards, tmp_path):
    """Four caches (as four local ranks) fetch and evict in one directory at once: a neighbour's
    reservation that ends while another lists the directory is not an error, the limit holds,
    and a reservation left by a killed process is not counted."""
    import threading

    server = HttpServer(digits_shards.parent, delay_s=0.002)
    try:
        manifest = json.loads((digits_shards / "manifest.json").read_text())
        shards = [s for split in manifest["splits"].values() for s in split["shards"]]
        limit = 5 * max(s["size"] for s in shards)  # four downloads at once fit; all shards do not
        assert limit < sum(s["size"] for s in shards)
        caches = [ShardCache(f"{server.url}/{digits_shards.name}", tmp_path / "cache", limit, window=0)
                  for _ in range(4)]
        for cache in caches:
            for s in shards:
                cache.expect(s["name"], s["size"], s.get("sha256"))
        errors, over = [], []

        def work(cache, k):
            try:
                for i in range(30):
                    cache.path(shards[(k + i) % len(shards)]["name"])
                    with_lock_used = cache._used_bytes()
                    if with_lock_used > limit + max(s["size"] for s in shards) * len(caches):
                        over.append(with_lock_used)
            except Exception as exc:  # noqa: BLE001 - the test reports any failure
                errors.append(repr(exc))

        threads = [threading.Thread(target=work, args=(c, k)) for k, c in enumerate(caches)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert not over
        files = [p for p in caches[0].dir.iterdir() if not p.name.startswith(".") and p.name != "SOURCE"]
        assert sum(p.stat().st_size for p in files) <= limit
        assert not list(caches[0].dir.glob("*.reserve"))
        # A download killed with its reservation in place: the next count drops it.
        (caches[0].dir / ".ghost.tar.reserve").write_text(f"{limit} 999999999")
        assert caches[0]._used_bytes() == sum(p.stat().st_size for p in files)
        for cache in caches:
            cache.close()
    finally:
        server.stop()


def test_a_cache_builds_one_s3_client_for_all_its_downloads(s3, s3_digits, tmp_path, monkeypatch):
    """A new S3 client loads botocore's endpoint rules and service model (~0.13 s of CPU on the
    loader's core, ten times a 27 MB download; BENCHMARKS.md): the cache makes one and every
    download reuses it."""
    import shard_tools.remote as remote
    import stream_pml.data.cache as cache_mod

    made = []
    real = remote.filesystem

    def counting(url, options=None):
        made.append(url)
        return real(url, options)

    monkeypatch.setattr(remote, "filesystem", counting)
    monkeypatch.setattr(cache_mod, "filesystem", counting)
    manifest = json.loads(s3.fs().cat_file(f"{s3_digits[len('s3://'):]}/manifest.json"))
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    cache = ShardCache(s3_digits, tmp_path / "cache", 10**9, window=0)
    try:
        for s in shards:
            cache.expect(s["name"], s["size"], s.get("sha256"))
            path = Path(cache.path(s["name"]))
            assert path.stat().st_size == s["size"]
    finally:
        cache.close()
    assert len(shards) > 3 and len(made) == 1, made

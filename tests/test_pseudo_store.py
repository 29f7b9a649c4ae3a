"""The Zarr pseudo-label store: lazy init, rank-owned writes, journal, crash consistency."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch

from stream_pml.pseudo_store import PseudoConfig, PseudoLabelStore, StoreError, decode, encode

ID = {"manifest": "abc", "split": "train"}


def _store(path, rows=100, classes=6, chunk=10, cfg=None, **kw):
    return PseudoLabelStore(path, rows, classes, chunk, ID, cfg or PseudoConfig(), **kw)


def _dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_fresh_store_reads_half_and_writes_only_metadata(tmp_path):
    store = _store(tmp_path / "s.zarr", rows=5_600_000, classes=600, chunk=1000)
    assert _dir_bytes(tmp_path / "s.zarr") < 10_000
    got = store.read(torch.tensor([0, 77, 5_599_999]))
    assert got.shape == (3, 600) and torch.all(got == 0.5)


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_encoding_round_trip(dtype):
    p = np.linspace(0, 1, 1001)
    err = np.abs(decode(encode(p, dtype), dtype) - p).max()
    assert err <= (0.5 / 254 + 1e-7 if dtype == "uint8" else 5e-4)
    assert decode(encode(np.array([0.5]), dtype), dtype)[0] == 0.5


def test_reads_see_pending_then_applied_values(tmp_path):
    store = _store(tmp_path / "s.zarr")
    store.set_owned_chunks([0, 1])
    rows = torch.tensor([3, 12, 5])
    probs = torch.tensor([[0.1] * 6, [0.9] * 6, [0.3] * 6])
    store.write(rows, probs)
    torch.testing.assert_close(store.read(rows), probs, atol=0.5 / 254, rtol=0)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    store.save_journal(ckpt, 0)
    store.apply_journal_async(ckpt, 0).result()
    assert store.pending_bytes == 0
    reopened = _store(tmp_path / "s.zarr")
    torch.testing.assert_close(reopened.read(rows), probs, atol=0.5 / 254, rtol=0)
    assert torch.all(reopened.read(torch.tensor([0, 99])) == 0.5)


def test_write_outside_owned_shards_is_refused(tmp_path):
    store = _store(tmp_path / "s.zarr")
    store.set_owned_chunks([0])
    with pytest.raises(StoreError, match="chunk 2"):
        store.write(torch.tensor([1, 25]), torch.zeros(2, 6))


def test_store_of_another_run_is_refused(tmp_path):
    _store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="num_classes"):
        _store(tmp_path / "s.zarr", classes=7)
    with pytest.raises(StoreError, match="identity"):
        PseudoLabelStore(tmp_path / "s.zarr", 100, 6, 10, {"manifest": "other"}, PseudoConfig())


def test_momentum_blends_old_and_new(tmp_path):
    store = _store(tmp_path / "s.zarr", cfg=PseudoConfig(momentum=0.5, dtype="float16"))
    store.write(torch.tensor([1]), torch.ones(1, 6))
    assert store.read(torch.tensor([1]))[0, 0].item() == pytest.approx(0.75)


def _rank_writer(path, rank, barrier):
    store = _store(path, create=False)
    owned = [c for c in range(10) if c % 2 == rank]
    store.set_owned_chunks(owned)
    rows = np.concatenate([np.arange(c * 10, c * 10 + 10) for c in owned])
    for k in range(5):  # several rounds, interleaved between the two processes
        barrier.wait()
        store.write(rows, np.full((len(rows), 6), (rank * 5 + k + 1) / 20.0))
        ckpt = path.parent / f"ckpt{k}"
        ckpt.mkdir(exist_ok=True)
        store.save_journal(ckpt, rank)
        store.apply_journal(ckpt, rank)
        store.discard_pending()


@pytest.mark.slow
def test_two_processes_writing_their_own_shards_lose_nothing(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_rank_writer, args=(path, r, barrier)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = _store(path).read(np.arange(100)).numpy()
    for chunk in range(10):
        rank = chunk % 2
        expected = (rank * 5 + 5) / 20.0
        assert np.allclose(got[chunk * 10:(chunk + 1) * 10], expected, atol=0.5 / 254), chunk


def test_crash_between_journal_and_apply_is_repaired_on_resume(tmp_path):
    path = tmp_path / "s.zarr"
    store = _store(path)
    rows = torch.arange(0, 30, 3)
    probs = torch.rand(len(rows), 6, generator=torch.Generator().manual_seed(0))
    store.write(rows, probs)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    store.save_journal(ckpt, 0)
    del store  # crash: the checkpoint is published, its journal never applied
    fresh = _store(path)
    assert torch.all(fresh.read(rows) == 0.5)
    assert fresh.apply_journal(ckpt, 0) is True
    assert fresh.apply_journal(ckpt, 0) is False  # marked applied: idempotent
    torch.testing.assert_close(_store(path).read(rows), probs, atol=0.5 / 254, rtol=0)


def test_crash_mid_apply_rolls_back_to_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    store = _store(path)
    rows = torch.arange(0, 100, 7)
    store.write(rows, torch.full((len(rows), 6), 0.2))
    ck1 = tmp_path / "ck1"
    ck1.mkdir()
    store.save_journal(ck1, 0)
    store.apply_journal_async(ck1, 0).result()
    before = _store(path).read(torch.arange(100)).clone()

    store.write(rows, torch.full((len(rows), 6), 0.8))
    ck2 = tmp_path / "ck2"
    ck2.mkdir()
    store.save_journal(ck2, 0)
    calls = {"n": 0}
    real = PseudoLabelStore._replace_chunk_file

    def dying_write(self, chunk, blob):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed mid-apply")
        real(self, chunk, blob)

    monkeypatch.setattr(PseudoLabelStore, "_replace_chunk_file", dying_write)
    with pytest.raises(KeyboardInterrupt):
        store.apply_journal(ck2, 0)
    monkeypatch.setattr(PseudoLabelStore, "_replace_chunk_file", real)
    half = _store(path).read(torch.arange(100))
    assert not torch.equal(half, before)  # the store is now ahead of ck1
    # Resuming from ck1 (say ck2 proved unreadable) rolls ck2's partial apply back.
    resumed = _store(path)
    assert resumed.rollback_journal(ck2, 0) is True
    assert torch.equal(_store(path).read(torch.arange(100)), before)
    # Resuming from ck2 instead re-applies it whole.
    assert resumed.apply_journal(ck2, 0) is True
    assert torch.allclose(_store(path).read(rows), torch.tensor(0.8), atol=0.5 / 254)


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_chunk_files_are_zarrs_own_format_both_ways(tmp_path, dtype):
    """The journal writes chunk files without Zarr; Zarr must read them, and we must read
    what Zarr writes (the last chunk is partial: 95 rows in chunks of 10)."""
    import zarr

    path = tmp_path / "s.zarr"
    store = _store(path, rows=95, cfg=PseudoConfig(dtype=dtype))
    rng = np.random.default_rng(0)
    rows = np.array([0, 9, 44, 90, 94])
    probs = rng.random((5, 6)).astype(np.float32)
    store.write(rows, probs)
    (tmp_path / "ck").mkdir()
    store.save_journal(tmp_path / "ck", 0)
    store.apply_journal_async(tmp_path / "ck", 0).result()
    by_zarr = zarr.open_array(str(path), mode="r")[:]
    expected = np.full((95, 6), encode(np.array(0.5), dtype))
    expected[rows] = encode(probs, dtype)
    np.testing.assert_array_equal(by_zarr, expected)

    written = encode(rng.random((95, 6)), dtype)
    zarr.open_array(str(path), mode="r+")[:] = written
    np.testing.assert_array_equal(_store(path, rows=95, cfg=PseudoConfig(dtype=dtype)).read(np.arange(95)).numpy(),
                                  decode(written, dtype))


def test_store_with_other_codecs_is_refused(tmp_path):
    import zarr

    from stream_pml.pseudo_store import ChunkCodec

    arr = zarr.create_array(store=str(tmp_path / "x.zarr"), shape=(10, 6), chunks=(5, 6), dtype="uint8",
                            compressors=zarr.codecs.BloscCodec())
    with pytest.raises(StoreError, match="not created by stream-pml"):
        ChunkCodec(arr, 5, 6)


def test_reads_during_a_background_apply_see_the_journal(tmp_path, monkeypatch):
    store = _store(tmp_path / "s.zarr")
    rows = torch.arange(0, 100, 3)
    store.write(rows, torch.full((len(rows), 6), 0.25))
    (tmp_path / "ck").mkdir()
    store.save_journal(tmp_path / "ck", 0)
    import threading
    release = threading.Event()
    real = PseudoLabelStore._replace_chunk_file

    def slow(self, chunk, blob):
        release.wait(10)
        real(self, chunk, blob)

    monkeypatch.setattr(PseudoLabelStore, "_replace_chunk_file", slow)
    future = store.apply_journal_async(tmp_path / "ck", 0)
    assert not future.done()
    torch.testing.assert_close(store.read(rows), torch.full((len(rows), 6), 0.25), atol=0.5 / 254, rtol=0)
    release.set()
    future.result()
    torch.testing.assert_close(store.read(rows), torch.full((len(rows), 6), 0.25), atol=0.5 / 254, rtol=0)
    assert torch.all(store.read(torch.tensor([1, 2])) == 0.5)


def test_write_between_journal_and_apply_is_refused(tmp_path):
    store = _store(tmp_path / "s.zarr")
    store.write(torch.tensor([1]), torch.ones(1, 6))
    (tmp_path / "ck").mkdir()
    store.save_journal(tmp_path / "ck", 0)
    store.write(torch.tensor([2]), torch.ones(1, 6))
    with pytest.raises(StoreError, match="in no journal"):
        store.apply_journal_async(tmp_path / "ck", 0)


def test_corrupt_chunk_file_is_named(tmp_path):
    store = _store(tmp_path / "s.zarr")
    store.write(torch.tensor([11]), torch.ones(1, 6))
    (tmp_path / "ck").mkdir()
    store.save_journal(tmp_path / "ck", 0)
    store.apply_journal_async(tmp_path / "ck", 0).result()
    chunk_file = store.chunk_file(1)
    chunk_file.write_bytes(b"not zstd")
    with pytest.raises(StoreError, match=r"c/1/0.*corrupt pseudo-label chunk 1"):
        _store(tmp_path / "s.zarr").read(torch.tensor([11]))

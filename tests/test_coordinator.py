"""Coordinator: registered states, checkpoint save/resume together with the pseudo-label store,
and the epoch hand-over of chunk ownership. One process, no process group: collectives are no-ops."""

from __future__ import annotations


import pytest
import torch

from stream_pml import checkpoint as ckpt
from stream_pml.coordinator import Coordinator
from stream_pml.distributed import DistInfo
from stream_pml.pseudo_store import PseudoConfig, PseudoLabelStore, StoreError

ID = {"manifest": "abc", "split": "train"}
RANK0 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
ATOL = 0.5 / 254  # uint8 store resolution
ROWS = torch.arange(0, 40, 3)  # rows in chunks 0-3 (10 rows a chunk)


class Counter:
    def __init__(self, n: int = 0):
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


@pytest.fixture
def make(tmp_path):
    """make() -> (coordinator, store): a fresh pair on the same run dir and store path, as a
    restarted process would build them."""
    stores = []

    def _make(keep: int = 3, cache_chunks: int = 4):
        store = PseudoLabelStore(tmp_path / "s.zarr", 100, 6, 10, ID, PseudoConfig(cache_chunks=cache_chunks))
        stores.append(store)
        return Coordinator(tmp_path / "run", RANK0, store, keep=keep), store

    yield _make
    for store in stores:
        store.close()


def _full(value: float) -> torch.Tensor:
    return torch.full((len(ROWS), 6), value)


def _assert_rows(store: PseudoLabelStore, value: float) -> None:
    torch.testing.assert_close(store.read(ROWS), _full(value), atol=ATOL, rtol=0)


def _states(seed: int, coord: Coordinator):
    torch.manual_seed(seed)
    lin, progress, rng = torch.nn.Linear(4, 3), Counter(seed), Counter(10 * seed)
    coord.register("model", lin)
    coord.register("progress", progress)
    coord.register("rng", rng, per_rank=True)
    return lin, progress, rng


def test_register_refuses_a_key_twice_across_shared_and_per_rank(make):
    coord, _ = make()
    coord.register("model", Counter())
    with pytest.raises(ValueError, match="'model'"):
        coord.register("model", Counter(), per_rank=True)
    coord.register("rng", Counter(), per_rank=True)
    with pytest.raises(ValueError, match="'rng'"):
        coord.register("rng", Counter())


def test_save_then_resume_restores_shared_and_per_rank_states(make):
    coord, store = make()
    lin, _, _ = _states(1, coord)
    path = coord.save(epoch=2, step=30)
    store.flush()  # the journal's background apply done, as when the process ended
    assert path.name == "ckpt-e0002-s000000030"
    assert (path / ckpt.MAIN_FILE).is_file() and (path / ckpt.RANK_FILE.format(rank=0)).is_file()

    coord2, _ = make()
    lin2, progress2, rng2 = _states(2, coord2)
    assert not torch.equal(lin2.weight, lin.weight)  # else the check below proves nothing
    assert coord2.resume() == path
    assert torch.equal(lin2.weight, lin.weight) and torch.equal(lin2.bias, lin.bias)
    assert (progress2.n, rng2.n) == (1, 10)


def test_disabled_resume_over_an_earlier_run_is_refused_and_changes_nothing(make):
    coord, store = make(keep=1)
    _states(1, coord)
    store.write(ROWS, _full(0.3))
    coord.save(1, 10)
    store.write(ROWS, _full(0.6))
    coord.save(1, 20)  # the first checkpoint is pruned: its journal can no longer be undone
    store.flush()

    coord2, store2 = make()
    lin, progress, rng = _states(3, coord2)
    weight = lin.weight.detach().clone()
    with pytest.raises(ckpt.ResumeError, match="train.resume=never"):
        coord2.resume(enabled=False)
    # A fresh store could not be had back: refused before anything was rolled back.
    assert torch.equal(lin.weight, weight) and (progress.n, rng.n) == (3, 30)
    _assert_rows(store2, 0.6)
    assert len(ckpt.list_checkpoints(coord2.run_dir)) == 1


def test_disabled_resume_without_checkpoints_starts_fresh(make):
    coord, store = make()
    progress = Counter(4)
    coord.register("progress", progress)
    assert coord.resume(enabled=False) is None and progress.n == 4
    assert torch.all(store.read(ROWS) == 0.5)


class Resharded(Counter):
    def load_resharded(self, states: list[dict]) -> None:
        self.old = [st["n"] for st in states]


def test_a_checkpoint_of_another_world_size_is_resharded(make):
    """A checkpoint of 2 processes resumed by 1: every old rank's journal reaches the store,
    per-rank states get every old rank's state, a state that cannot be re-dealt refuses."""
    coord, store = make()
    coord.register("progress", Counter(1))
    coord.register("position", Resharded(5), per_rank=True)
    store.write(ROWS[ROWS < 20], torch.full((int((ROWS < 20).sum()), 6), 0.3))
    saved = coord.save(1, 10)
    store.flush()
    # What a second rank of that run left: its own rows (chunks 5-6), journaled, not applied.
    other_rows = torch.arange(50, 70, 2)
    store.write(other_rows, torch.full((len(other_rows), 6), 0.7))
    store.save_journal(saved, 1)
    store.discard_pending()
    torch.save({"position": {"n": 6}}, saved / ckpt.RANK_FILE.format(rank=1))
    main_state = torch.load(saved / ckpt.MAIN_FILE, weights_only=False)
    torch.save({**main_state, "world_size": 2}, saved / ckpt.MAIN_FILE)

    coord2, store2 = make()
    coord2.register("progress", Counter())
    position = Resharded()
    coord2.register("position", position, per_rank=True)
    assert coord2.resume() == saved and coord2.resumed_world_size == 2
    assert position.old == [5, 6]
    torch.testing.assert_close(store2.read(other_rows), torch.full((len(other_rows), 6), 0.7), atol=ATOL, rtol=0)
    torch.testing.assert_close(store2.read(ROWS[ROWS < 20]), torch.full((int((ROWS < 20).sum()), 6), 0.3),
                               atol=ATOL, rtol=0)

    coord3, _ = make()
    coord3.register("progress", Counter())
    coord3.register("position", Counter(), per_rank=True)
    with pytest.raises(ckpt.ResumeError, match="state 'position' cannot be re-dealt"):
        coord3.resume()


def test_checkpoints_none_of_which_is_readable_stop_the_run(make):
    """Never a silent fresh start over a run's checkpoints."""
    coord, store = make()
    coord.register("progress", Counter(1))
    saved = coord.save(1, 10)
    store.flush()
    (saved / ckpt.MAIN_FILE).write_bytes(b"damaged")
    coord2, _ = make()
    coord2.register("progress", Counter())
    with pytest.warns(UserWarning, match="skipping unreadable"), \
            pytest.raises(ckpt.ResumeError, match="none is readable by every rank"):
        coord2.resume()


def test_resume_without_a_published_checkpoint_returns_none(make, tmp_path):
    coord, _ = make()
    progress = Counter(5)
    coord.register("progress", progress)
    assert coord.resume() is None
    ckpt.prepare(tmp_path / "run", 1, 5)  # an interrupted save's .tmp leftover is not a checkpoint
    assert coord.resume() is None and progress.n == 5


@pytest.mark.parametrize("per_rank", [False, True])
def test_resume_from_a_checkpoint_lacking_a_registered_key_names_it(make, per_rank):
    coord, store = make()
    coord.register("model", Counter(1))
    coord.save(1, 1)
    store.flush()
    coord2, _ = make()
    coord2.register("model", Counter())
    coord2.register("estimator", Counter(), per_rank=per_rank)
    with pytest.raises(ValueError, match="estimator"):
        coord2.resume()


def test_resume_brings_the_store_to_the_checkpoint_not_to_later_writes(make):
    coord, store = make()
    store.write(ROWS, _full(0.2))
    coord.save(1, 10)
    store.write(ROWS, _full(0.9))  # after the checkpoint: in no journal, lost with the process
    _assert_rows(store, 0.9)
    store.flush()
    coord2, store2 = make()
    assert coord2.resume() is not None
    _assert_rows(store2, 0.2)


def test_resume_past_an_unreadable_newest_checkpoint_rolls_its_journal_back(make):
    coord, store = make()
    progress = Counter(1)
    coord.register("progress", progress)
    store.write(ROWS, _full(0.2))
    ck1 = coord.save(1, 10)
    progress.n = 2
    store.write(ROWS, _full(0.8))
    ck2 = coord.save(1, 20)
    store.flush()
    _assert_rows(make()[1], 0.8)  # ck2's journal did reach the store
    (ck2 / ckpt.MAIN_FILE).write_bytes(b"truncated")

    coord2, store2 = make()
    progress2 = Counter()
    coord2.register("progress", progress2)
    with pytest.warns(UserWarning, match=ck2.name):
        assert coord2.resume() == ck1
    assert progress2.n == 1
    _assert_rows(store2, 0.2)


def test_a_rolled_back_journal_is_not_reapplied_by_a_later_resume(make):
    coord, store = make()
    store.write(ROWS, _full(0.2))
    coord.save(1, 10)
    store.write(ROWS, _full(0.8))
    ck2 = coord.save(1, 15)  # say a signal's checkpoint, then found unreadable
    store.flush()
    (ck2 / ckpt.MAIN_FILE).write_bytes(b"truncated")
    coord2, store2 = make()
    with pytest.warns(UserWarning, match="set aside"):
        coord2.resume()  # from ck1: ck2 rolled back, store at 0.2
    assert not ck2.exists() and ck2.with_name(ck2.name + ".abandoned").is_dir()  # kept, unlisted
    store2.write(ROWS, _full(0.5))
    ck3 = coord2.save(1, 20)
    store2.flush()
    coord3, store3 = make()
    assert coord3.resume() == ck3
    _assert_rows(store3, 0.5)  # 0.8 if ck2's journal, listed before ck3, were applied again


def _other_rank_rewrites_chunk0(other: PseudoLabelStore, ck_dir) -> None:
    """Rank 1 (a second store on the same path) owns chunk 0, sets it to 0.9, checkpoints it."""
    other.set_owned_chunks([0])
    other.write(torch.arange(10), torch.full((10, 6), 0.9))
    ck_dir.mkdir()
    other.save_journal(ck_dir, 1)
    other.apply_journal_async(ck_dir, 1).result()


def test_hand_over_drops_a_cached_chunk_another_rank_rewrote(make, tmp_path):
    coord, mine = make(cache_chunks=64)
    rows = torch.arange(10)  # chunk 0
    coord.hand_over([0, 1])  # epoch 1: this rank owns chunk 0
    assert torch.all(mine.read(rows) == 0.5)  # now decoded in the cache
    coord.hand_over([1])  # epoch 2: chunk 0 goes to the other rank, which rewrites it
    _other_rank_rewrites_chunk0(make()[1], tmp_path / "other-ck")
    coord.hand_over([0])  # epoch 3: chunk 0 comes back
    torch.testing.assert_close(mine.read(rows), torch.full((10, 6), 0.9), atol=ATOL, rtol=0)


def test_without_a_hand_over_the_cached_copy_is_served_stale(make, tmp_path):
    # The negative of the test above: the cache is real, so dropping it is what makes that pass.
    coord, mine = make(cache_chunks=64)
    rows = torch.arange(10)
    coord.hand_over([0, 1])
    assert torch.all(mine.read(rows) == 0.5)
    _other_rank_rewrites_chunk0(make()[1], tmp_path / "other-ck")
    coord.hand_over([0, 1])  # chunk 0 still owned: its cached copy is kept
    assert torch.all(mine.read(rows) == 0.5)
    torch.testing.assert_close(make()[1].read(rows), torch.full((10, 6), 0.9), atol=ATOL, rtol=0)


def test_ownership_change_is_refused_until_updates_are_saved_and_applied(make, tmp_path):
    coord, store = make()
    coord.hand_over([0])
    store.write(torch.tensor([1]), torch.ones(1, 6))
    with pytest.raises(StoreError, match=r"chunks \[0\]"):  # pending, in no journal
        coord.hand_over([1])
    (tmp_path / "ck").mkdir()
    store.save_journal(tmp_path / "ck", 0)
    with pytest.raises(StoreError, match=r"chunks \[0\]"):  # journaled, not yet applied
        store.set_owned_chunks([1])
    store.discard_pending()
    store.write(torch.tensor([1]), torch.ones(1, 6))
    coord.save(1, 5)  # published; its apply may still run: hand_over waits for it
    coord.hand_over([1])
    assert store.owned == {1}


def test_writes_are_refused_outside_the_chunks_handed_over(make):
    coord, store = make()
    coord.hand_over([0, 2])
    store.write(torch.tensor([5, 25]), torch.ones(2, 6))
    with pytest.raises(StoreError, match="chunk 1"):
        store.write(torch.tensor([15]), torch.ones(1, 6))
    coord.save(1, 1)
    coord.hand_over([1])
    with pytest.raises(StoreError, match="chunk 0"):
        store.write(torch.tensor([5]), torch.ones(1, 6))
    store.write(torch.tensor([15]), torch.ones(1, 6))


def test_prune_keeps_the_newest_set_aside_checkpoints_too(tmp_path):
    """A run resumed many times sets aside a checkpoint each time: only the keep newest of
    them stay, beside the keep newest checkpoints; a save's leftover goes."""
    import os

    from stream_pml import checkpoint as ckpt

    root = ckpt.checkpoints_dir(tmp_path)
    root.mkdir(parents=True)
    for step in range(1, 6):
        (root / f"ckpt-e0001-s{step:09d}").mkdir()
        aside = root / f"ckpt-e0001-s{step + 10:09d}.abandoned"
        aside.mkdir()
        os.utime(aside, ns=(step * 10**9, step * 10**9))
    (root / "ckpt-e0001-s000000099.tmp").mkdir()
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in root.iterdir()) == [
        "ckpt-e0001-s000000004", "ckpt-e0001-s000000005",
        "ckpt-e0001-s000000014.abandoned", "ckpt-e0001-s000000015.abandoned"]

"""Label settings on the real COCO val2014 label matrix (40,137 x 80), and the row-by-row
form every rank computes from positives alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stream_pml.labels import PartialLabels, entry_uniform, make_partial, read_split_labels, setting_hash


@pytest.fixture(scope="module")
def coco_full(sample_data) -> np.ndarray:
    entries = json.loads((sample_data / "coco2014-val-labels/val_anno.json").read_text())
    full = np.zeros((len(entries), 80), dtype=np.int8)
    for i, e in enumerate(entries):
        full[i, e["labels"]] = 1
    assert full.shape == (40137, 80) and full.sum() == 116592
    return full


def _within(observed: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(observed - p) <= sigmas * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.9])
def test_pal_keeps_the_share_of_every_entry(coco_full, ratio):
    part = make_partial(coco_full, "pal", ratio)
    known = part >= 0
    assert _within(known.mean(), ratio, known.size)
    pos = coco_full == 1
    assert _within(known[pos].mean(), ratio, int(pos.sum()))  # positives and negatives alike
    assert (part[known] == coco_full[known]).all()


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.9])
def test_ppl_keeps_no_negative_and_the_share_of_positives(coco_full, ratio):
    part = make_partial(coco_full, "ppl", ratio)
    assert not (part == 0).any()
    assert ((part == 1) <= (coco_full == 1)).all()
    kept = (part == 1).sum(1)
    assert (kept[coco_full.sum(1) > 0] >= 1).all()
    share = (part == 1).sum() / coco_full.sum()
    one_each = (coco_full.sum(1) > 0).sum() / coco_full.sum()  # 0.344 on COCO
    if ratio <= one_each:
        assert (kept == 1).all() and share == pytest.approx(one_each)
    else:
        assert abs(share - ratio) < 0.01


def test_spl_leaves_exactly_one_positive_per_image(coco_full):
    part = make_partial(coco_full, "spl")
    assert ((part == 1).sum(1) == 1).all()
    assert not (part == 0).any()
    assert (coco_full[part == 1] == 1).all()
    # Uniform choice: person (in 54% of images) is the kept label far less often than it appears.
    assert (part[:, 49] == 1).mean() < 0.54


@pytest.mark.parametrize("setting, ratio", [("pal", 0.3), ("ppl", 0.6), ("spl", None)])
def test_same_seed_same_mask_other_seed_other_mask(coco_full, setting, ratio):
    a = make_partial(coco_full, setting, ratio)
    b = make_partial(coco_full, setting, ratio)
    c = make_partial(coco_full, setting, ratio, seed=7)
    assert setting_hash(a) == setting_hash(b) != setting_hash(c)
    assert np.array_equal(a, b)


def test_fal_is_the_full_matrix(coco_full):
    assert np.array_equal(make_partial(coco_full, "fal"), coco_full)


def test_split_labels_file_matches_the_shards(digits_shards):
    import webdataset as wds

    from shard_tools.manifest import load_manifest

    manifest = load_manifest(digits_shards)
    table = read_split_labels(digits_shards, "train", manifest.num_classes)
    for shard in manifest.splits["train"].shards:
        for s in wds.WebDataset(str(digits_shards / shard.name), shardshuffle=False, empty_check=False):
            row = int(np.frombuffer(s["row"], "<i8")[0])
            assert np.nonzero(table[row] == 1)[0].tolist() == np.frombuffer(s["pos"], "<i4").tolist()
            assert np.nonzero(table[row] == 0)[0].tolist() == np.frombuffer(s["neg"], "<i4").tolist()


@pytest.mark.parametrize("setting, ratio", [("pal", 0.3), ("ppl", 0.6), ("spl", None), ("fal", None)])
def test_any_rows_in_any_order_get_the_rows_of_the_whole_mask(coco_full, setting, ratio):
    labels = PartialLabels.from_dense(coco_full, setting, ratio)
    whole = labels.dense(block_rows=4096)  # built in blocks: blocks must not matter either
    rows = np.random.default_rng(3).permutation(len(coco_full))[:257]
    assert np.array_equal(labels.rows(rows), whole[rows])
    assert np.array_equal(labels.rows(rows[::-1]), whole[rows[::-1]])
    assert np.array_equal(labels.full(rows), coco_full[rows])


def test_setting_hash_names_the_mask_and_the_labels(coco_full):
    def h(full=coco_full, setting="pal", ratio=0.3, seed=None):
        return PartialLabels.from_dense(full, setting, ratio, seed).hash

    assert h() == h() and len(h()) == 16
    other_labels = coco_full.copy()
    other_labels[0, 0] ^= 1
    assert len({h(), h(ratio=0.4), h(seed=5), h(setting="ppl"), h(full=other_labels)}) == 5


def test_entry_draws_are_uniform_and_independent_of_neighbours():
    u = entry_uniform(0, 1, np.arange(20_000), 50)
    assert u.shape == (20_000, 50) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.002 and abs(u.var() - 1 / 12) < 0.001
    # Adjacent classes and adjacent rows: no correlation a hash of a counter could leak.
    assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(u[:-1].ravel(), u[1:].ravel())[0, 1]) < 0.01
    assert not np.array_equal(u, entry_uniform(1, 1, np.arange(20_000), 50))
    assert not np.array_equal(u, entry_uniform(0, 2, np.arange(20_000), 50))


def test_split_setting_reads_positives_only_and_matches_the_dense_form(digits_shards):
    from shard_tools.manifest import load_manifest

    num_classes = load_manifest(digits_shards).num_classes
    labels = PartialLabels.from_split(digits_shards, "train", num_classes, "pal", 0.5)
    full = read_split_labels(digits_shards, "train", num_classes)
    assert np.array_equal(labels.dense(), make_partial(full, "pal", 0.5))
    # No (N, C) array is held: only the CSR of positives.
    held = [v for v in vars(labels).values() if isinstance(v, np.ndarray)]
    assert sum(v.nbytes for v in held) <= 8 * (len(full) + 1 + int((full == 1).sum()))

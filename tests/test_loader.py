"""The DALI loader over tiny shards: rank-owned shards, exact eval coverage, seeded order."""

from __future__ import annotations

import numpy as np

from stream_pml.data.batch import dense_labels
from stream_pml.data.config import DataConfig
from stream_pml.data.loader import ShardLoader, deal_shards


def _cfg(shards, **kw):
    base = dict(shards=str(shards), image_size=32, batch_size=8, eval_batch_size=16,
                num_threads=1, shuffle_buffer=8)
    base.update(kw)
    return DataConfig(**base)


def test_deal_is_a_partition_that_changes_with_epoch():
    deals = [deal_shards(10, 3, seed=0, epoch=e) for e in (1, 2)]
    for deal in deals:
        assert sorted(i for owned in deal for i in owned) == list(range(10))
    assert deals[0] != deals[1]
    assert deal_shards(10, 3, 0, 1) == deals[0]


def test_train_batches_come_from_owned_shards_only(digits_shards):
    loaders = [ShardLoader(_cfg(digits_shards), rank=r, world_size=2, seed=3) for r in range(2)]
    shard_size = loaders[0].manifest.shard_size
    seen = []
    for loader in loaders:
        owned = set(loader.owned_train_shards(1))
        batches = list(loader.train_epoch(1))
        assert len(batches) == loader.num_batches(1)
        rows = np.concatenate([b.rows_B.numpy() for b in batches])
        assert {int(r) // shard_size for r in rows} <= owned
        assert batches[0].images_BCHW.dtype.is_floating_point is False
        assert tuple(batches[0].images_BCHW.shape) == (8, 3, 32, 32)
        seen.append(set(rows.tolist()))
    assert not seen[0] & seen[1]


def test_train_order_is_reproducible(digits_shards):
    def rows(seed):
        loader = ShardLoader(_cfg(digits_shards), seed=seed)
        return [b.rows_B.tolist() for b in loader.train_epoch(1)]

    assert rows(1) == rows(1)
    assert rows(1) != rows(2)


def test_eval_covers_every_sample_once_with_its_labels(digits_shards):
    import json

    import webdataset as wds

    loader = ShardLoader(_cfg(digits_shards, test_split="test"))
    expected = {}
    for shard in loader.manifest.splits["test"].shards:
        for s in wds.WebDataset(str(digits_shards / shard.name), shardshuffle=False, empty_check=False):
            meta = json.loads(s["json"])
            expected[meta["row"]] = [loader.manifest.classes.index(n) for n in meta["positives"]]
    got = {}
    for b in loader.eval_batches("test"):
        targets, known = dense_labels(b.pos_BP, b.neg_BN, loader.num_classes)
        assert known.all()
        for row, t in zip(b.rows_B.tolist(), targets):
            got[row] = np.nonzero(t.numpy())[0].tolist()
    assert got == expected

"""The DALI loader over tiny shards: rank-owned shards, exact eval coverage, seeded order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stream_pml.data.batch import dense_labels
from stream_pml.data.config import DataConfig
from stream_pml.data.loader import ShardLoader


# dali-external: DALI decoding samples read in Python (data.dali_source=external).
# device: torchvision's decode_jpeg on the training device (here the CPU; nvJPEG on CUDA).
BACKENDS = pytest.mark.parametrize("backend", ["dali", "torch", "dali-external", "device"])


def _cfg(shards, backend="dali", **kw):
    source = "external" if backend == "dali-external" else "reader"
    base = dict(shards=str(shards), image_size=32, batch_size=8, eval_batch_size=16,
                num_threads=1, shuffle_buffer=8, backend=backend.split("-")[0], dali_source=source)
    base.update(kw)
    return DataConfig(**base)


@BACKENDS
def test_train_batches_come_from_owned_pieces_once_each(digits_shards, backend):
    """3 ranks over the demo's shards: pieces of 8 rows split shards between ranks; each rank
    reads only its pieces, every sample once, all but the deal's bounded leftovers."""
    world = 3
    loaders = [ShardLoader(_cfg(digits_shards, backend), rank=r, world_size=world, seed=3) for r in range(world)]
    deal = loaders[0].deal(1)
    seen = []
    for loader in loaders:
        owned = set(loader.owned_pieces(1))
        batches = list(loader.train_epoch(1))
        assert len(batches) == loader.num_batches(1) == deal.num_batches
        rows = np.concatenate([b.rows_B.numpy() for b in batches])
        assert {int(r) // loader.piece_rows for r in rows} <= owned
        assert len(rows) == len(set(rows.tolist())) == deal.num_samples(loader.rank) - deal.left_out(loader.rank)
        assert deal.left_out(loader.rank) <= 8
        assert batches[0].images_BCHW.dtype.is_floating_point is False
        assert tuple(batches[0].images_BCHW.shape) == (8, 3, 32, 32)
        seen.append(set(rows.tolist()))
    assert sum(map(len, seen)) == len(set().union(*seen))
    assert len(set().union(*seen)) >= loaders[0].train_split.num_samples - world * 8


@BACKENDS
def test_train_order_is_reproducible(digits_shards, backend):
    def rows(seed):
        loader = ShardLoader(_cfg(digits_shards, backend), seed=seed)
        return [b.rows_B.tolist() for b in loader.train_epoch(1)]

    assert rows(1) == rows(1)
    assert rows(1) != rows(2)


@BACKENDS
def test_eval_covers_every_sample_once_with_its_labels(digits_shards, backend):
    import json

    import webdataset as wds

    loader = ShardLoader(_cfg(digits_shards, backend, test_split="test"))
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


@BACKENDS
def test_stream_resumes_exactly_from_its_checkpoint(digits_shards, backend):
    """N batches, snapshot, rebuild from the snapshot: the next K batches are identical."""
    loader = ShardLoader(_cfg(digits_shards, backend), seed=5)
    stream = loader.train_stream(2)
    it = iter(stream)
    for _ in range(4):
        next(it)
    snapshot = stream.checkpoint()
    expected = [next(it) for _ in range(3)]
    resumed = iter(loader.train_stream(2, checkpoint=snapshot, max_batches=3))
    for a in expected:
        b = next(resumed)
        assert torch.equal(a.rows_B, b.rows_B) and torch.equal(a.images_BCHW, b.images_BCHW)
        assert torch.equal(a.pos_BP, b.pos_BP) and torch.equal(a.neg_BN, b.neg_BN)
    assert next(resumed, None) is None


def test_backends_agree_on_labels_and_roughly_on_pixels(digits_shards):
    """Same eval split through both backends: identical rows and labels, close pixels."""
    out = {}
    for backend in ("dali", "torch"):
        loader = ShardLoader(_cfg(digits_shards, backend, test_split="test"))
        batches = list(loader.eval_batches("test"))
        out[backend] = {int(r): (b.images_BCHW[i].float(), set(b.pos_BP[i].tolist()) - {-1})
                        for b in batches for i, r in enumerate(b.rows_B)}
    assert out["dali"].keys() == out["torch"].keys()
    for row, (img, pos) in out["dali"].items():
        img_t, pos_t = out["torch"][row]
        assert pos == pos_t
        assert (img - img_t).abs().mean() < 12  # two resize kernels, same picture


def test_dali_fed_externally_gives_the_torch_backends_batches(digits_shards):
    """Same rows, labels and flips in the same batches as the torch backend (its order and
    reads), pixels from DALI's decoder: close to the torch backend's, flipped alike."""
    kw = dict(seed=4, world_size=2, rank=1)
    ext = list(ShardLoader(_cfg(digits_shards, "dali-external", flip=True), **kw).train_epoch(2))
    ref = list(ShardLoader(_cfg(digits_shards, "torch", flip=True), **kw).train_epoch(2))
    assert len(ext) == len(ref) > 1
    for a, b in zip(ext, ref):
        assert torch.equal(a.rows_B, b.rows_B)
        assert torch.equal(a.pos_BP, b.pos_BP) and torch.equal(a.neg_BN, b.neg_BN)
        assert (a.images_BCHW.float() - b.images_BCHW.float()).abs().mean() < 12


def test_dali_fed_externally_skips_unreadable_samples_like_the_torch_backend(digits_shards, tmp_path):
    """A zeroed image (its header is not an image's) and a truncated shard's lost samples are
    skipped and named before DALI sees them; the other samples still come, through DALI."""
    from stream_pml.data.dali_external import DaliExternalStream
    from stream_pml.data.torch_stream import read_index

    tars, idxs, offset = _corrupt_copy(digits_shards, tmp_path)
    with open(tars[3], "r+b") as f:
        f.truncate(int(read_index(idxs[3])[20, 0, 0]))  # the last shard loses its last 4 samples
    stream = DaliExternalStream(tars, idxs, image_size=32, batch_size=8, train=True, flip=True, seed=0,
                                num_threads=1, shuffle_buffer=8)
    with pytest.warns(UserWarning, match="so far"):
        rows = np.concatenate([b.rows_B.numpy() for b in stream])
    assert len(rows) == len(set(rows.tolist())) == 96 - 1 - 4 and len(stream.builder.bad) == 5
    assert any(f"byte {offset}: ValueError" in line for line in stream.builder.bad)
    assert sum("truncated shard" in line for line in stream.builder.bad) == 4


def test_normalize_matches_the_imagenet_formula():
    from stream_pml.data.batch import IMAGENET_MEAN, IMAGENET_STD, normalize

    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x), (x.float() / 255 - mean) / std)
    assert normalize(x, channels_last=True).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalizer_reuses_its_buffer_and_matches_normalize(channels_last):
    from stream_pml.data.batch import Normalizer, normalize

    norm = Normalizer(channels_last)
    a = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    out_a = norm(a)
    torch.testing.assert_close(out_a, normalize(a), rtol=0, atol=0)
    assert out_a.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ptr = out_a.data_ptr()
    out_b = norm(b)
    assert out_b.data_ptr() == ptr  # the same memory, overwritten
    torch.testing.assert_close(out_b, normalize(b), rtol=0, atol=0)
    last = torch.randint(0, 256, (1, 3, 5, 4), dtype=torch.uint8)  # an epoch's short last batch
    torch.testing.assert_close(norm(last), normalize(last), rtol=0, atol=0)


def _corrupt_copy(digits_shards, tmp_path):
    import shutil

    from shard_tools.manifest import load_manifest, shard_paths
    from stream_pml.data.torch_stream import read_index

    copy = tmp_path / "shards"
    shutil.copytree(digits_shards, copy)
    tars, idxs = shard_paths(copy, load_manifest(copy).splits["train"])
    offset, size = read_index(idxs[1])[5, 0]  # the 6th image of the 2nd shard
    with open(tars[1], "r+b") as f:
        f.seek(int(offset))
        f.write(b"\0" * int(size))
    return tars, idxs, int(offset)


def test_torch_backend_skips_counts_and_names_a_corrupt_image(digits_shards, tmp_path):
    from stream_pml.data.torch_stream import TorchShardStream

    tars, idxs, offset = _corrupt_copy(digits_shards, tmp_path)
    for train in (False, True):
        stream = TorchShardStream(tars, idxs, image_size=32, batch_size=8, train=train, flip=False,
                                  seed=0, num_workers=2, shuffle_buffer=8)
        with pytest.warns(UserWarning, match=rf"\(1 so far\): .*{Path(tars[1]).name}: sample at byte {offset}"):
            batches = list(stream)
        rows = np.concatenate([b.rows_B.numpy() for b in batches])
        assert len(rows) == 95  # all 96 but the corrupt one: its batch is one smaller
        assert len(set(rows.tolist())) == len(rows) and 24 + 5 not in rows  # the 2nd shard's 6th row
        assert stream.builder.bad == [stream.builder.bad[0]] and f"byte {offset}" in stream.builder.bad[0]


def test_torch_backend_stops_past_max_bad_samples_naming_the_sample(digits_shards, tmp_path):
    from stream_pml.data.torch_stream import BadSamples, TorchShardStream

    tars, idxs, offset = _corrupt_copy(digits_shards, tmp_path)
    stream = TorchShardStream(tars, idxs, image_size=32, batch_size=8, train=False, flip=False,
                              seed=0, num_workers=2, max_bad_samples=0)
    with pytest.raises(BadSamples, match=rf"{Path(tars[1]).name}: sample at byte {offset} .*max_bad_samples=0"):
        list(stream)


def test_torch_backend_skips_the_lost_part_of_a_truncated_shard(digits_shards, tmp_path):
    from stream_pml.data.torch_stream import TorchShardStream, read_index

    tars, idxs, _ = _corrupt_copy(digits_shards, tmp_path)
    cut = int(read_index(idxs[3])[20, 0, 0])  # the last shard loses its last 4 samples
    with open(tars[3], "r+b") as f:
        f.truncate(cut)
    stream = TorchShardStream(tars, idxs, image_size=32, batch_size=8, train=False, flip=False,
                              seed=0, num_workers=1)
    with pytest.warns(UserWarning, match="truncated shard"):
        rows = np.concatenate([b.rows_B.numpy() for b in stream])
    assert len(rows) == 96 - 1 - 4 and len(stream.builder.bad) == 5


def test_torch_backend_threads_give_the_same_batches_as_one_thread(digits_shards):
    from shard_tools.manifest import load_manifest, shard_paths
    from stream_pml.data.torch_stream import TorchShardStream

    tars, idxs = shard_paths(digits_shards, load_manifest(digits_shards).splits["train"])

    def batches(workers):
        return list(TorchShardStream(tars, idxs, image_size=32, batch_size=8, train=True, flip=True,
                                     seed=4, num_workers=workers))

    for a, b in zip(batches(0), batches(3), strict=True):
        assert torch.equal(a.images_BCHW, b.images_BCHW) and torch.equal(a.rows_B, b.rows_B)


def test_an_epoch_that_leaves_samples_out_says_so(digits_shards, capsys):
    from stream_pml.data.loader import ShardLoader

    # 96 samples in 24 pieces of 4 on 5 ranks: one rank has 4 pieces, four have 5, so four
    # ranks leave out one piece each (within the one-batch bound), and the run says so.
    loader = ShardLoader(_cfg(digits_shards, "torch", batch_size=4), rank=0, world_size=5, seed=0)
    loader.train_stream(1)
    assert "epoch 1 trains 80 of 96 samples (16 left out: pieces of 4 rows dealt to 5 ranks, " \
           "4 batches each)" in capsys.readouterr().err
    ShardLoader(_cfg(digits_shards, "torch"), rank=0, world_size=2, seed=0).train_stream(1)
    assert capsys.readouterr().err == ""  # 6 pieces of 8 each: nothing left out


def _garbled_copy(digits_shards, tmp_path):
    """Shards whose 2nd shard's 6th image keeps its JPEG header but not its data: it passes
    the header check made at read time and fails in every decoder (DALI's, nvJPEG's and
    torchvision's, libjpeg-turbo's); its 7th keeps a header and zeroed data, which the CPU
    decoder takes (grey) and torchvision's refuses."""
    import shutil

    from shard_tools.manifest import load_manifest, shard_paths
    from stream_pml.data.torch_stream import check_header, decode_resize, read_index

    copy = tmp_path / "shards"
    shutil.copytree(digits_shards, copy)
    tars, idxs = shard_paths(copy, load_manifest(copy).splits["train"])
    spans = read_index(idxs[1])
    with open(tars[1], "r+b") as f:
        offset, size = (int(v) for v in spans[5, 0])
        f.seek(offset + 200)
        f.write(bytes((np.arange(size - 200) * 37 % 251).astype(np.uint8)))
        f.seek(offset)
        garbled = f.read(size)
        zoff, zsize = (int(v) for v in spans[6, 0])
        f.seek(zoff + zsize * 4 // 5)  # the tables stay, the end of the scan goes
        f.write(b"\0" * (zsize - zsize * 4 // 5))
    check_header(garbled)
    with pytest.raises(Exception):
        decode_resize(garbled, 32)
    return tars, idxs, offset


@pytest.mark.parametrize("backend", ["torch", "device", "dali-external"])
def test_a_jpeg_with_a_good_header_and_bad_data_is_skipped_and_named(digits_shards, tmp_path, backend):
    """The same policy on every backend that reads in Python: the sample nothing decodes is
    skipped (its batch one smaller), named by shard and byte offset, and counted; the rest of
    the epoch comes, in the torch backend's order. DALI rebuilds its pipeline past the batch."""
    import warnings

    from stream_pml.data.dali_external import DaliExternalStream
    from stream_pml.data.device_decode import DeviceDecodeStream
    from stream_pml.data.torch_stream import TorchShardStream

    tars, idxs, offset = _garbled_copy(digits_shards, tmp_path)
    cls = {"torch": TorchShardStream, "device": DeviceDecodeStream, "dali-external": DaliExternalStream}[backend]
    kw = dict(image_size=32, batch_size=8, train=True, flip=True, seed=0, num_threads=1, num_workers=1,
              shuffle_buffer=8)
    stream = cls(tars, idxs, **kw)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        batches = list(stream)
    rows = [b.rows_B.tolist() for b in batches]
    assert sum(map(len, rows)) == 95 and 24 + 5 not in sum(rows, [])
    assert len(stream.builder.bad) == 1 and f"sample at byte {offset}" in stream.builder.bad[0]
    clean = TorchShardStream(tars, idxs, **kw)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        expected = [[r for r in b.rows_B.tolist() if r != 24 + 5] for b in clean]
    assert rows == expected  # the same batches, the bad sample's one smaller


def test_device_decoder_falls_back_to_the_cpu_and_stops_past_max_bad_samples(digits_shards, tmp_path):
    from stream_pml.data.device_decode import DeviceDecodeStream
    from stream_pml.data.torch_stream import BadSamples, TorchShardStream

    tars, idxs, offset = _garbled_copy(digits_shards, tmp_path)
    kw = dict(image_size=32, batch_size=8, train=False, flip=False, seed=0, num_threads=1, num_workers=1)
    with pytest.raises(BadSamples, match=rf"sample at byte {offset} .*max_bad_samples=0"):
        list(DeviceDecodeStream(tars, idxs, max_bad_samples=0, **kw))
    # The zeroed-data sample (7th of the 2nd shard, row 30) is decoded by the CPU fallback,
    # to the CPU backend's very pixels.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dev = {int(r): img for b in DeviceDecodeStream(tars, idxs, **kw) for r, img in zip(b.rows_B, b.images_BCHW)}
        cpu = {int(r): img for b in TorchShardStream(tars, idxs, **kw) for r, img in zip(b.rows_B, b.images_BCHW)}
    assert dev.keys() == cpu.keys() and 30 in dev and 29 not in dev
    assert torch.equal(dev[30], cpu[30])
    assert np.mean([(dev[r].float() - cpu[r].float()).abs().mean().item() for r in dev]) < 8

"""The one shard writer every dataset module feeds: tars, DALI indexes, keys, report, manifest.

A dataset module only yields :class:`Record` objects; this module shuffles them (seeded,
because DALI only shuffles inside a buffer), checks and optionally re-encodes each image,
assigns global row ids in write order and writes fixed-size shards (DESIGN.md sections 1-2).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from .manifest import (
    CLASS_ID_DTYPE,
    EXT_IMAGE,
    EXT_JSON,
    EXT_NEG,
    EXT_POS,
    EXT_ROW,
    ROW_DTYPE,
    Manifest,
    ShardInfo,
    SplitInfo,
    sha256_file,
)


@dataclass
class Record:
    """One sample as a dataset module sees it: a source key, an image and observed labels."""

    key: str
    pos: list[int]
    neg: list[int]
    image_path: str | None = None
    image_bytes: bytes | None = None

    def read_image(self) -> bytes:
        if self.image_bytes is not None:
            return self.image_bytes
        assert self.image_path is not None
        with open(self.image_path, "rb") as f:
            return f.read()


@dataclass
class EncodeOptions:
    """How images are stored. ``max_side=0`` and ``quality=0`` keep valid JPEG bytes as they are."""

    max_side: int = 0
    quality: int = 0

    def as_dict(self) -> dict:
        return {"max_side": self.max_side, "quality": self.quality or "source",
                "format": "jpeg", "color": "RGB", "exif_transposed": self.reencodes}

    @property
    def reencodes(self) -> bool:
        return self.max_side > 0 or self.quality > 0


class BadInput(Exception):
    """A sample that cannot be written; the report names it and the build goes on."""


class Report:
    """Every problem met while building, with where it was and what was done about it."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.rows: list[dict] = []

    def add(self, problem: str, where: str, detail: str, action: str) -> None:
        row = {"problem": problem, "where": where, "detail": detail, "action": action}
        if self.strict:
            raise BadInput(f"{where}: {problem}: {detail} (strict mode)")
        self.rows.append(row)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row["problem"]] = out.get(row["problem"], 0) + 1
        return out

    def save(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["problem", "where", "detail", "action"])
            w.writeheader()
            w.writerows(self.rows)


def prepare_image(raw: bytes, enc: EncodeOptions) -> tuple[bytes, tuple[int, int]]:
    """Decode fully (a truncated file must fail here, not in training) and re-encode if asked.

    Non-JPEG sources and JPEGs other than RGB or grayscale (CMYK, YCCK) are always re-encoded
    as RGB JPEG: every reader decodes those two to RGB itself.
    """
    try:
        img = Image.open(io.BytesIO(raw))
        fmt = img.format
        img.load()
    except Exception as exc:  # PIL raises many types for bad data
        raise BadInput(f"image does not decode ({type(exc).__name__}: {exc})") from exc
    if not enc.reencodes and fmt == "JPEG" and img.mode in ("RGB", "L"):
        return raw, img.size
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        img = background
    img = img.convert("RGB")
    if enc.max_side and max(img.size) > enc.max_side:
        img.thumbnail((enc.max_side, enc.max_side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=enc.quality or 90)
    return out.getvalue(), img.size


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # deterministic tars: the same input gives the same checksum
    tar.addfile(info, io.BytesIO(data))
    # TarInfo.offset_data is only filled in when reading; after addfile the archive offset
    # sits just past this member's data padded to the 512-byte block.
    padded = -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return tar.offset - padded, info.size


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write a tar and its DALI index (format v1.2, as nvidia.dali's wds2idx writes it)."""
    tmp = path.with_name(path.name + ".tmp")
    lines = []
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            parts = []
            for ext, data in members.items():
                member = f"{key}.{ext}"
                offset, size = _add_member(tar, member, data)
                parts.append(f"{ext} {offset} {size} {member}")
            lines.append(" ".join(parts))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    idx_tmp = path.with_suffix(".idx.tmp")
    idx_tmp.write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
    tmp.replace(path)
    idx_tmp.replace(path.with_suffix(".idx"))


def encode_labels(row: int, pos: Iterable[int], neg: Iterable[int]) -> dict[str, bytes]:
    return {
        EXT_ROW: np.asarray([row], dtype=ROW_DTYPE).tobytes(),
        EXT_POS: np.asarray(sorted(pos), dtype=CLASS_ID_DTYPE).tobytes(),
        EXT_NEG: np.asarray(sorted(neg), dtype=CLASS_ID_DTYPE).tobytes(),
    }


def write_split(
    records: list[Record],
    out_dir: Path,
    split: str,
    classes: list[str],
    shard_size: int,
    seed: int,
    enc: EncodeOptions,
    report: Report,
    fully_labelled: bool,
) -> SplitInfo:
    """Shuffle ``records`` with ``seed`` and write them as ``{split}-NNNNNN.tar`` shards."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    order = np.random.default_rng(seed).permutation(len(records))
    shards: list[ShardInfo] = []
    keys: list[str] = []
    pos_lists: list[list[int]] = []
    neg_lists: list[list[int]] = []
    pending: list[tuple[str, dict[str, bytes]]] = []
    num_pos = num_neg = 0

    def flush() -> None:
        s = len(shards)
        name = f"{split}-{s:06d}.tar"
        _write_shard(out_dir / name, pending)
        row_start = s * shard_size
        shards.append(ShardInfo(name=name, index=name[:-4] + ".idx", num_samples=len(pending),
                                row_start=row_start, row_stop=row_start + len(pending),
                                sha256=sha256_file(out_dir / name)))
        pending.clear()

    bar = tqdm(order, desc=f"{split}", unit="img", dynamic_ncols=True, mininterval=1.0)
    for i in bar:
        rec = records[int(i)]
        try:
            raw = rec.read_image()
        except OSError as exc:
            report.add("missing_image", rec.image_path or rec.key, str(exc), "sample skipped")
            continue
        try:
            jpeg, size_wh = prepare_image(raw, enc)
        except BadInput as exc:
            report.add("bad_image", rec.image_path or rec.key, str(exc), "sample skipped")
            continue
        row = len(keys)
        members = {EXT_IMAGE: jpeg, **encode_labels(row, rec.pos, rec.neg)}
        members[EXT_JSON] = json.dumps({
            "key": rec.key, "row": row, "width": size_wh[0], "height": size_wh[1],
            "positives": [classes[c] for c in sorted(rec.pos)],
            "negatives": [classes[c] for c in sorted(rec.neg)],
        }).encode()
        # Sample names inside the tar are the zero-padded row: unique, dot-free, sortable.
        pending.append((f"{row:010d}", members))
        keys.append(rec.key)
        pos_lists.append(sorted(rec.pos))
        neg_lists.append(sorted(rec.neg))
        num_pos += len(rec.pos)
        num_neg += len(rec.neg)
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    if not keys:
        raise BadInput(f"split {split}: no sample could be written (see the report)")
    keys_file = f"{split}.keys.txt"
    (out_dir / keys_file).write_text("\n".join(keys) + "\n")
    # The whole split's observed labels in CSR form, so label settings (PAL, SPL, ...) and
    # statistics need no pass over the images.
    np.savez(out_dir / f"{split}.labels.npz", **_csr("pos", pos_lists), **_csr("neg", neg_lists))
    return SplitInfo(num_samples=len(keys), shards=shards, fully_labelled=fully_labelled,
                     num_positives=num_pos, num_negatives=num_neg, keys_file=keys_file)


def _csr(name: str, lists: list[list[int]]) -> dict[str, np.ndarray]:
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    indices = np.fromiter((c for x in lists for c in x), dtype=np.int32, count=int(indptr[-1]))
    return {f"{name}_indptr": indptr, f"{name}_indices": indices}


@dataclass
class BuildSpec:
    """What a dataset module hands the writer: classes and the records of each split."""

    dataset: str
    classes: list[str]
    splits: dict[str, list[Record]]
    fully_labelled: dict[str, bool]
    source: dict = field(default_factory=dict)


def build(spec: BuildSpec, out_dir: Path | str, shard_size: int, seed: int,
          enc: EncodeOptions, report: Report) -> Manifest:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(dataset=spec.dataset, classes=spec.classes, shard_size=shard_size,
                        seed=seed, image_encoding=enc.as_dict(), source=spec.source)
    try:
        for split, records in spec.splits.items():
            # Each split gets its own stream so adding a split never reorders another.
            split_seed = int(np.random.SeedSequence([seed, len(split), *split.encode()]).generate_state(1)[0])
            manifest.splits[split] = write_split(records, out_dir, split, spec.classes, shard_size,
                                                 split_seed, enc, report, spec.fully_labelled[split])
    finally:
        report.save(out_dir / "build_report.csv")
    manifest.save(out_dir)
    return manifest

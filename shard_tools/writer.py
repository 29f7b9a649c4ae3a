"""The one shard writer every dataset module feeds: tars, DALI indexes, keys, report, manifest.

A dataset module only yields :class:`Record` objects; this module shuffles them (seeded,
because DALI only shuffles inside a buffer), checks and optionally re-encodes each image,
assigns global row ids in write order and writes fixed-size shards (docs/design.md#row-ids-in-shard-order).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import tarfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

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
    # Where the sample was listed (file:line), named in the report next to the image.
    source: str = ""

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


REPORT_NAME = "build_report.csv"
REPORT_FIELDS = ["split", "problem", "where", "detail", "action"]


class Report:
    """Every problem met while building, with where it was and what was done about it.

    Rows carry the split they belong to; rows met before any split is written (label files)
    belong to every split of the build, written as their names joined by ``+``.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.split: str | None = None
        self.rows: list[dict] = []

    def add(self, problem: str, where: str, detail: str, action: str) -> None:
        row = {"split": self.split, "problem": problem, "where": where, "detail": detail, "action": action}
        if self.strict:
            raise BadInput(f"{where}: {problem}: {detail} (strict mode)")
        self.rows.append(row)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row["problem"]] = out.get(row["problem"], 0) + 1
        return out

    def save(self, path: Path, splits: list[str]) -> None:
        """Write this build's rows into ``path``, keeping the rows of every other split: a
        directory holds one report for all its splits, and building ``test`` must not erase
        what ``train`` found. Rows of a split built again are replaced (they are found again)."""
        joined = "+".join(splits)
        rows = [{**r, "split": r["split"] or joined} for r in self.rows]
        kept = [r for r in read_report(path) if not set(r["split"].split("+")) & set(splits)]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=REPORT_FIELDS)
            w.writeheader()
            w.writerows(kept + rows)
        tmp.replace(path)


def read_report(path: Path) -> list[dict]:
    """Rows of a build report; a report written before the split column existed gives its
    rows the split ``?`` (kept, since which split they belong to is not known)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{"split": r.get("split") or "?", **{k: r.get(k) or "" for k in REPORT_FIELDS[1:]}}
                for r in csv.DictReader(f)]


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


def _check_record(rec: Record, enc: EncodeOptions) -> tuple[str, str] | None:
    """(problem, detail) when the record cannot be written, else None (pass 1)."""
    try:
        raw = rec.read_image()
    except OSError as exc:
        return "missing_image", str(exc)
    try:
        prepare_image(raw, enc)
    except BadInput as exc:
        return "bad_image", str(exc)
    return None


def _check_task(args: tuple[int, Record, EncodeOptions]) -> tuple[int, tuple[str, str] | None]:
    index, rec, enc = args
    return index, _check_record(rec, enc)


def _shard_task(args: tuple[Path, list[Record], int, list[str], EncodeOptions]) -> tuple[str, int]:
    """Write one shard (pass 2); returns (file name, samples)."""
    path, recs, row_start, classes, enc = args
    samples = []
    for k, rec in enumerate(recs):
        row = row_start + k
        try:
            jpeg, size_wh = prepare_image(rec.read_image(), enc)
        except (OSError, BadInput) as exc:
            # Pass 1 decoded it: the file changed under the build.
            raise BadInput(f"{rec.image_path or rec.key}: readable in the check pass, not now ({exc}); "
                           f"rerun the build") from exc
        members = {EXT_IMAGE: jpeg, **encode_labels(row, rec.pos, rec.neg)}
        members[EXT_JSON] = json.dumps({
            "key": rec.key, "row": row, "width": size_wh[0], "height": size_wh[1],
            "positives": [classes[c] for c in sorted(rec.pos)],
            "negatives": [classes[c] for c in sorted(rec.neg)],
        }).encode()
        # Sample names inside the tar are the zero-padded row: unique, dot-free, sortable.
        samples.append((f"{row:010d}", members))
    _write_shard(path, samples)
    return path.name, len(samples)


def _plan_hash(records: Sequence[Record], order: np.ndarray, shard_size: int, enc: EncodeOptions) -> str:
    h = hashlib.sha256(f"{shard_size}|{enc.as_dict()}".encode())
    for i in order:
        rec = records[int(i)]
        h.update(f"{rec.key}|{rec.image_path}|{rec.pos}|{rec.neg}\n".encode())
        if rec.image_bytes is not None:
            h.update(hashlib.sha256(rec.image_bytes).digest())
    return h.hexdigest()


def _map(fn, tasks: Iterable, workers: int, desc: str, unit: str, total_units: list[int] | None = None,
         num_tasks: int | None = None):
    """Run ``fn`` over ``tasks`` (any iterable: a generator keeps only the tasks in flight in
    memory) in ``workers`` processes (inline for 1), with a progress bar counting
    ``total_units`` (e.g. images per shard) so the rate reads in images/s."""
    if total_units is not None:
        num_tasks = len(total_units)
    elif num_tasks is None:
        num_tasks = len(tasks)
    weights = total_units if total_units is not None else [1] * num_tasks
    bar = tqdm(total=sum(weights), desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0)
    try:
        if workers <= 1:
            for task, w in zip(tasks, weights):
                yield fn(task)
                bar.update(w)
            return
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            chunk = 1 if total_units is not None else max(1, min(64, num_tasks // (workers * 8)))
            for i, result in enumerate(pool.imap(fn, tasks, chunksize=chunk)):
                yield result
                bar.update(weights[i])
    finally:
        bar.close()


def write_split(
    records: Sequence[Record],
    out_dir: Path,
    split: str,
    classes: list[str],
    shard_size: int,
    seed: int,
    enc: EncodeOptions,
    report: Report,
    workers: int = 1,
    overwrite: bool = False,
) -> SplitInfo:
    """Shuffle ``records`` with ``seed`` and write them as ``{split}-NNNNNN.tar`` shards.

    Pass 1 decodes every image (in ``workers`` processes) so bad ones are reported and
    dropped before row ids are given out; pass 2 writes shards in parallel. A rerun with the
    same inputs skips pass 1 and every shard already written whose checksum still matches.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    order = np.random.default_rng(seed).permutation(len(records))
    plan = _plan_hash(records, order, shard_size, enc)
    state_path = out_dir / f"{split}.build_state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    earlier = sorted(p.name for p in out_dir.glob(f"{split}-*.tar"))
    if state.get("plan") != plan and (state or earlier) and not overwrite:
        # Not a rerun of this build (its plan differs, or shards of an unknown build are here).
        raise BadInput(f"{out_dir}: holds another build of split {split} ({len(earlier)} shards"
                       f"{', other inputs or settings' if state else ''}); use --overwrite to replace it "
                       "or a new --out")
    if state.get("plan") != plan:
        state = {"plan": plan, "bad": None, "done": {}}

    if state["bad"] is None:
        tasks = ((int(i), records[int(i)], enc) for i in order)
        bad = [[i, *problem] for i, problem in _map(_check_task, tasks, workers, f"{split} check", "img",
                                                    num_tasks=len(order)) if problem is not None]
        state["bad"] = bad
        _save_state(state_path, state)
    bad_index = set()
    report.split = split
    for i, problem, detail in state["bad"]:
        rec = records[i]
        listed = f" (listed at {rec.source})" if rec.source else ""
        report.add(problem, rec.image_path or rec.key, detail + listed, "sample skipped")
        bad_index.add(i)
    good = _Subset(records, np.asarray([i for i in order.tolist() if i not in bad_index], dtype=np.int64))
    if not len(good):
        raise BadInput(f"split {split}: no sample could be written (see the report)")

    num_shards = -(-len(good) // shard_size)
    names = [f"{split}-{s:06d}.tar" for s in range(num_shards)]
    todo = [s for s in range(num_shards)
            if not (names[s] in state["done"] and (out_dir / names[s]).is_file()
                    and (out_dir / names[s]).with_suffix(".idx").is_file()
                    and sha256_file(out_dir / names[s]) == state["done"][names[s]])]
    tasks = ((out_dir / names[s], good[s * shard_size:(s + 1) * shard_size], s * shard_size, classes, enc)
             for s in todo)
    sizes = [min(shard_size, len(good) - s * shard_size) for s in todo]
    for name, _ in _map(_shard_task, tasks, workers, f"{split} write", "img", sizes):
        state["done"][name] = sha256_file(out_dir / name)
        _save_state(state_path, state)

    # No file of an earlier build survives that this manifest does not list.
    for stale in sorted(set(earlier) - set(names)):
        (out_dir / stale).unlink(missing_ok=True)
        (out_dir / stale).with_suffix(".idx").unlink(missing_ok=True)
    shards = []
    for s, name in enumerate(names):
        n = min(shard_size, len(good) - s * shard_size)
        shards.append(ShardInfo(name=name, index=name[:-4] + ".idx", num_samples=n,
                                row_start=s * shard_size, row_stop=s * shard_size + n,
                                sha256=state["done"][name], size=(out_dir / name).stat().st_size,
                                index_sha256=sha256_file(out_dir / (name[:-4] + ".idx"))))
    keys_file = f"{split}.keys.txt"
    (out_dir / keys_file).write_text("\n".join(rec.key for rec in good) + "\n")
    # The whole split's observed labels in CSR form, so label settings (PAL, SPL, ...) and
    # statistics need no pass over the images.
    pos_csr, neg_csr, fully_labelled = _label_csr(good, len(classes))
    np.savez(out_dir / f"{split}.labels.npz", **pos_csr, **neg_csr)
    return SplitInfo(num_samples=len(good), shards=shards, fully_labelled=fully_labelled,
                     num_positives=int(pos_csr["pos_indptr"][-1]), num_negatives=int(neg_csr["neg_indptr"][-1]),
                     keys_file=keys_file)


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


class _Subset(Sequence):
    """``records[index[i]]``, built on access (records may be a lazy sequence)."""

    def __init__(self, records: Sequence[Record], index: np.ndarray):
        self._records, self._index = records, index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._records[int(j)] for j in self._index[i]]
        return self._records[int(self._index[i])]


def _label_csr(records: Sequence[Record], num_classes: int) -> tuple[dict, dict, bool]:
    """The split's observed labels in CSR form, in one pass; and whether every image has a
    value for every class (from the data, not the dataset's reputation: one image missing
    one class's value, a conflict or a malformed entry makes the split partially labelled)."""
    parts: dict[str, tuple[array, array]] = {"pos": (array("q", [0]), array("i")),
                                             "neg": (array("q", [0]), array("i"))}
    fully = True
    for rec in records:
        for name, labels in (("pos", rec.pos), ("neg", rec.neg)):
            indptr, indices = parts[name]
            indices.extend(sorted(labels))
            indptr.append(len(indices))
        fully = fully and len(rec.pos) + len(rec.neg) == num_classes
    out = [{f"{n}_indptr": np.frombuffer(indptr, dtype=np.int64).copy(),
            f"{n}_indices": np.frombuffer(indices, dtype=np.int32).copy()}
           for n, (indptr, indices) in parts.items()]
    return out[0], out[1], fully


@dataclass
class BuildSpec:
    """What a dataset module hands the writer: classes and the records of each split."""

    dataset: str
    classes: list[str]
    splits: dict[str, Sequence[Record]]
    source: dict = field(default_factory=dict)
    # Per split: recorded as that split's ``labels`` in the manifest.
    split_labels: dict[str, dict] = field(default_factory=dict)


def build(spec: BuildSpec, out_dir: Path | str, shard_size: int, seed: int,
          enc: EncodeOptions, report: Report, workers: int = 1, overwrite: bool = False) -> Manifest:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(dataset=spec.dataset, classes=spec.classes, shard_size=shard_size,
                        seed=seed, image_encoding=enc.as_dict(), source=spec.source)
    try:
        for split, records in spec.splits.items():
            # Each split gets its own stream so adding a split never reorders another.
            split_seed = int(np.random.SeedSequence([seed, len(split), *split.encode()]).generate_state(1)[0])
            manifest.splits[split] = write_split(records, out_dir, split, spec.classes, shard_size,
                                                 split_seed, enc, report, workers, overwrite)
            manifest.splits[split].labels = spec.split_labels.get(split, {})
    finally:
        report.save(out_dir / REPORT_NAME, list(spec.splits))
    manifest.save(out_dir)
    return manifest

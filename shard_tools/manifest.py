"""The shard format's manifest: what a shard directory holds, and its checks.

Layout of a built dataset directory (docs/design.md#row-ids-in-shard-order)::

    manifest.json
    {split}-{NNNNNN}.tar    samples: KEY.jpg, KEY.row (int64 LE), KEY.pos / KEY.neg (int32 LE), KEY.json
    {split}-{NNNNNN}.idx    DALI webdataset index of that tar
    {split}.keys.txt        line r = source id of the sample with global row id r
    {split}.labels.npz      observed positive / negative ids of every row (CSR)

The sample at position k of shard s has row ``s * shard_size + k``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_NAME = "stream-pml-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Member extensions of one sample, in tar order. Raw integers are little-endian so DALI's
# webdataset reader can hand them over as typed tensors without any parsing.
EXT_IMAGE = "jpg"
EXT_ROW = "row"
EXT_POS = "pos"
EXT_NEG = "neg"
EXT_JSON = "json"
ROW_DTYPE = "<i8"
CLASS_ID_DTYPE = "<i4"


class ManifestError(ValueError):
    """A shard directory or manifest that is missing, malformed or inconsistent."""


@dataclass
class ShardInfo:
    name: str
    index: str
    num_samples: int
    row_start: int
    row_stop: int
    sha256: str
    # Bytes of the .tar and sha256 of the .idx: what a download from remote storage is
    # checked against (0 / "" in manifests written before they were recorded).
    size: int = 0
    index_sha256: str = ""


@dataclass
class SplitInfo:
    num_samples: int
    shards: list[ShardInfo]
    # True when every (image, class) entry is observed (positive or negative).
    fully_labelled: bool
    num_positives: int = 0
    num_negatives: int = 0
    keys_file: str = ""
    # How the labels were made beyond the files themselves, e.g. {"hierarchy": {...}} when a
    # class hierarchy expanded them (empty: the files' rows as they are).
    labels: dict = field(default_factory=dict)


@dataclass
class Manifest:
    dataset: str
    classes: list[str]
    shard_size: int
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    seed: int = 0
    image_encoding: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_ids(self) -> list[str]:
        """The source's own class identifiers (Open Images' MIDs) where the builder recorded
        them, else the class names."""
        ids = self.source.get("class_ids")
        return list(ids) if ids and len(ids) == len(self.classes) else list(self.classes)

    def split(self, name: str, path: Path | str = "") -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(
                f"{Path(path) / MANIFEST_NAME}: no split {name!r}; it has {sorted(self.splits)}"
            )
        return self.splits[name]

    def fingerprint(self) -> str:
        """Hash of what a run depends on: classes, shard layout and shard contents."""
        payload = {
            "classes": self.classes,
            "shard_size": self.shard_size,
            "splits": {k: [s.sha256 for s in v.shards] for k, v in sorted(self.splits.items())},
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        data = asdict(self)
        data["num_classes"] = self.num_classes
        return json.dumps(data, indent=1)

    def save(self, directory: Path | str) -> Path:
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path


def load_manifest(directory: Path | str) -> Manifest:
    """Read and check ``directory/manifest.json`` (a local directory or a remote URL,
    ``shard_tools.remote``); every error names the file and the problem."""
    from .remote import RemoteError, is_remote, join, read_text

    if is_remote(directory):
        url = join(str(directory), MANIFEST_NAME)
        try:
            return parse_manifest(read_text(url), url)
        except RemoteError as exc:
            raise ManifestError(f"{exc} (no manifest there? build with `shard-tools build ... --out URL`)") from None
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ManifestError(f"shard directory {directory} does not exist")
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; build shards with `shard-tools build ...`")
    return parse_manifest(path.read_text(), path)


def parse_manifest(text: str, path: Path | str) -> Manifest:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if data.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path}: format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
    if data.get("version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: version {data.get('version')}, this code reads {FORMAT_VERSION}")
    data.pop("num_classes", None)
    try:
        splits = {
            name: SplitInfo(**{**s, "shards": [ShardInfo(**sh) for sh in s["shards"]]})
            for name, s in data.pop("splits").items()
        }
        manifest = Manifest(**data, splits=splits)
    except (TypeError, KeyError) as exc:
        raise ManifestError(f"{path}: malformed manifest ({exc})") from exc
    for split_name, split in manifest.splits.items():
        _check_split(path, manifest.shard_size, split_name, split)
    return manifest


def _check_split(path: Path, shard_size: int, name: str, split: SplitInfo) -> None:
    total = 0
    for s, shard in enumerate(split.shards):
        expected_start = s * shard_size
        is_last = s == len(split.shards) - 1
        if shard.row_start != expected_start or shard.row_stop != shard.row_start + shard.num_samples:
            raise ManifestError(f"{path}: split {name} shard {shard.name} has rows "
                                f"[{shard.row_start}, {shard.row_stop}), expected start {expected_start}")
        if shard.num_samples != shard_size and not is_last:
            raise ManifestError(f"{path}: split {name} shard {shard.name} holds {shard.num_samples} "
                                f"samples; every shard but the last must hold {shard_size}")
        total += shard.num_samples
    if total != split.num_samples:
        raise ManifestError(f"{path}: split {name} shards hold {total} samples, manifest says "
                            f"{split.num_samples}")


def shard_paths(directory: Path | str, split: SplitInfo) -> tuple[list[str], list[str]]:
    """Absolute tar and index paths of a split, checking that each exists."""
    directory = Path(directory)
    tars, idxs = [], []
    for shard in split.shards:
        for name, out in ((shard.name, tars), (shard.index, idxs)):
            p = directory / name
            if not p.is_file():
                raise ManifestError(f"{p}: listed in {directory / MANIFEST_NAME} but missing")
            out.append(str(p))
    return tars, idxs


def sha256_file(path: Path | str, block_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block_bytes):
            h.update(chunk)
    return h.hexdigest()

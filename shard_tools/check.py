"""``shard-tools verify`` and ``shard-tools inspect``: trust, then look."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .manifest import CLASS_ID_DTYPE, ROW_DTYPE, load_manifest, sha256_file
from .writer import REPORT_NAME, read_report

MEMBERS = ("jpg", "row", "pos", "neg", "json")


def _verify_shard(directory: Path, shard, num_classes: int) -> list[str]:
    problems = []
    path = directory / shard.name
    if not path.is_file():
        return [f"{path}: missing"]
    if sha256_file(path) != shard.sha256:
        problems.append(f"{path}: checksum differs from the manifest")
    idx = directory / shard.index
    if not idx.is_file():
        problems.append(f"{idx}: missing index")
    else:
        header = idx.read_text().split("\n", 1)[0].split()
        if len(header) != 2 or int(header[1]) != shard.num_samples:
            problems.append(f"{idx}: header {header}, expected {shard.num_samples} samples")
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as exc:
        return problems + [f"{path}: unreadable tar ({exc})"]
    if len(samples) != shard.num_samples:
        problems.append(f"{path}: {len(samples)} samples, manifest says {shard.num_samples}")
    for k, (key, members) in enumerate(samples.items()):
        where = f"{path} sample {key}"
        missing = [m for m in MEMBERS if m not in members]
        if missing:
            problems.append(f"{where}: missing members {missing}")
            continue
        row = int(np.frombuffer(members["row"], ROW_DTYPE)[0])
        if row != shard.row_start + k:
            problems.append(f"{where}: row {row}, expected {shard.row_start + k}")
        pos = np.frombuffer(members["pos"], CLASS_ID_DTYPE)
        neg = np.frombuffer(members["neg"], CLASS_ID_DTYPE)
        ids = np.concatenate([pos, neg])
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            problems.append(f"{where}: class id out of range [0, {num_classes})")
        if np.intersect1d(pos, neg).size:
            problems.append(f"{where}: a class is both positive and negative")
        try:
            Image.open(io.BytesIO(members["jpg"])).load()
        except Exception as exc:
            problems.append(f"{where}: image does not decode ({exc})")
    return problems


def verify(directory: Path | str) -> int:
    from .remote import is_remote

    if is_remote(directory):
        return _verify_remote(str(directory))
    directory = Path(directory)
    manifest = load_manifest(directory)
    problems: list[str] = []
    total = sum(s.num_samples for split in manifest.splits.values() for s in split.shards)
    bar = tqdm(total=total, desc="verify", unit="img", dynamic_ncols=True, mininterval=1.0)
    for split in manifest.splits.values():
        for shard in split.shards:
            problems += _verify_shard(Path(directory), shard, manifest.num_classes)
            bar.update(shard.num_samples)
    bar.close()
    listed = {s.name for split in manifest.splits.values() for s in split.shards}
    listed |= {n[: -len(".tar")] + ".idx" for n in listed if n.endswith(".tar")}
    # A file the manifest does not list (an earlier build's, say) is trained on by anyone who
    # globs the directory: reported, never silent.
    for stray in sorted(p.name for p in Path(directory).iterdir() if p.suffix in (".tar", ".idx")):
        if stray not in listed:
            problems.append(f"{Path(directory) / stray}: not listed in the manifest (left by another build?)")
    num_shards = sum(len(s.shards) for s in manifest.splits.values())
    # The count first: a summary that leads with "verified" reads as a pass.
    print(f"{len(problems)} problems in {num_shards} shards ({total} samples)" +
          (":" if problems else ": verified"))
    for p in problems:
        print(p)
    _print_report_totals(Path(directory), list(manifest.splits))
    return 0 if not problems else 1


def _verify_remote(url: str) -> int:
    """Every file the manifest lists is downloaded (checked against its sha256 on the way)
    into a temporary directory and verified there; files under ``url`` it does not list are
    reported."""
    import tempfile

    from .manifest import MANIFEST_NAME
    from .remote import RemoteError, download, filesystem, join

    manifest = load_manifest(url)
    fs, root = filesystem(url)
    with tempfile.TemporaryDirectory(prefix="shard-verify-") as tmp:
        local = Path(tmp)
        (local / MANIFEST_NAME).write_text(manifest.to_json())
        problems = []
        for split_name, split in manifest.splits.items():
            names = [(s.name, s.sha256) for s in split.shards] + [(s.index, s.index_sha256) for s in split.shards]
            names += [(n, None) for n in (split.keys_file, f"{split_name}.labels.npz", REPORT_NAME) if n]
            for name, sha in names:
                try:
                    download(join(url, name), local / name, sha256=sha or None, fs=fs)
                except RemoteError as exc:
                    if name != REPORT_NAME:
                        problems.append(str(exc))
        listed = {p.name for p in local.iterdir()}
        for path in fs.ls(root, detail=False):
            name = str(path).rstrip("/").rsplit("/", 1)[-1]
            if name.endswith((".tar", ".idx")) and name not in listed:
                problems.append(f"{join(url, name)}: not listed in the manifest (left by another build?)")
        for p in problems:
            print(p)
        rc = verify(local)
        return 1 if problems else rc


def _print_report_totals(directory: Path, splits: list[str]) -> None:
    """What each split's build met, so a problem of an earlier split is not forgotten."""
    rows = read_report(directory / REPORT_NAME)
    covered = {part for r in rows for part in r["split"].split("+")}
    by_split: dict[str, dict[str, int]] = {split: {} for split in splits if split not in covered}
    for r in rows:
        counts = by_split.setdefault(r["split"], {})
        counts[r["problem"]] = counts.get(r["problem"], 0) + 1
    for split, counts in by_split.items():
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"build report, split {split}: {sum(counts.values())} problems" + (f" ({detail})" if detail else ""))


def inspect(directory: Path, split: str | None, num_images: int) -> int:
    from stream_pml.labels import read_split_labels  # the shard format's label file reader

    directory = Path(directory)
    manifest = load_manifest(directory)
    split = split or next(iter(manifest.splits))
    info = manifest.split(split, directory)
    labels = read_split_labels(directory, split, manifest.num_classes)
    pos_per_class = (labels == 1).sum(0)
    neg_per_class = (labels == 0).sum(0)
    pos_per_image = (labels == 1).sum(1)
    neg_per_image = (labels == 0).sum(1)
    order = np.argsort(-pos_per_class, kind="stable")
    lines = [f"# {manifest.dataset} / {split}: {info.num_samples} images, {manifest.num_classes} classes", "",
             f"- positives per image: mean {pos_per_image.mean():.2f}, median {np.median(pos_per_image):.0f}, "
             f"max {pos_per_image.max()}, images with none {(pos_per_image == 0).sum()}",
             f"- negatives per image: mean {neg_per_image.mean():.2f}",
             f"- unknown share of entries: {(labels < 0).mean():.3f}",
             f"- classes with no positive: {(pos_per_class == 0).sum()}", "",
             "| class | positives | negatives |", "|---|---|---|"]
    lines += [f"| {manifest.classes[c]} | {pos_per_class[c]} | {neg_per_class[c]} |" for c in order]
    (directory / f"inspect_{split}.md").write_text("\n".join(lines) + "\n")
    sheet = directory / f"contact_{split}.png"
    _contact_sheet(directory, info, manifest.classes, num_images, sheet)
    print("\n".join(lines[:7]))
    print(f"wrote {directory / f'inspect_{split}.md'} and {sheet}")
    return 0


def _contact_sheet(directory: Path, info, classes: list[str], num_images: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = []
    for shard in info.shards:
        with tarfile.open(directory / shard.name) as tar:
            current: dict[str, bytes] = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                current[ext] = tar.extractfile(member).read()
                if ext == "json":
                    samples.append(dict(current))
                    current = {}
                if len(samples) >= num_images:
                    break
        if len(samples) >= num_images:
            break
    cols = min(4, len(samples))
    rows = -(-len(samples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), dpi=90, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples):
        ax.imshow(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        meta = json.loads(s["json"])
        title = ", ".join(meta["positives"][:4]) or "(no positive)"
        ax.set_title(f"row {meta['row']}: {title}", fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)

"""The embedded sample dataset: mosaics of scikit-learn's real handwritten digits.

Each image is a 2x2 grid holding 1-4 distinct digits, so an image has several labels, and
digit classes are drawn with Zipf-like weights so label frequencies are uneven, as in real
multi-label data. Source digits are split disjointly between splits (no leakage). Everything
comes from the scikit-learn wheel: no network.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .writer import Record

CLASSES = [f"digit_{d}" for d in range(10)]
# Share of images holding 1, 2, 3 and 4 digits.
NUM_DIGITS_P = np.array([0.3, 0.35, 0.2, 0.15])
CLASS_WEIGHTS = 1.0 / np.arange(1, 11) ** 0.8


def _mosaic(rng: np.random.Generator, digit_images: list[np.ndarray], size: int) -> Image.Image:
    cell = size // 2
    canvas = rng.integers(0, 40, size=(size, size, 3), dtype=np.int32)
    cells = rng.permutation(4)[: len(digit_images)]
    for img8, c in zip(digit_images, cells):
        side = int(rng.integers(int(cell * 0.6), cell + 1))
        digit = Image.fromarray((img8 * (255.0 / 16.0)).astype(np.uint8)).resize(
            (side, side), Image.Resampling.BILINEAR)
        ink = np.asarray(digit, dtype=np.float32)[..., None] / 255.0
        color = rng.integers(120, 256, size=3)
        y0 = (c // 2) * cell + int(rng.integers(0, cell - side + 1))
        x0 = (c % 2) * cell + int(rng.integers(0, cell - side + 1))
        patch = canvas[y0:y0 + side, x0:x0 + side]
        canvas[y0:y0 + side, x0:x0 + side] = (patch * (1 - ink) + color * ink).astype(np.int32)
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def make_records(split_sizes: dict[str, int], image_size: int = 64, seed: int = 0) -> dict[str, list[Record]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    rng = np.random.default_rng(seed)
    # Disjoint pools of source digits per split, in proportion to the split sizes.
    order = rng.permutation(len(images))
    total = sum(split_sizes.values())
    # At least 100 source digits per split, so a small split's pool holds every class
    # (a pool of 2 digits made a 16-image split fail); the largest split gives them up.
    shares = [max(100, round(len(images) * n / total)) for n in split_sizes.values()]
    shares[int(np.argmax(shares))] -= sum(shares) - len(images)
    bounds = np.cumsum([0] + shares)
    bounds[-1] = len(images)
    out: dict[str, list[Record]] = {}
    p = CLASS_WEIGHTS / CLASS_WEIGHTS.sum()
    for (split, n), lo, hi in zip(split_sizes.items(), bounds[:-1], bounds[1:]):
        pool = order[lo:hi]
        by_class = {d: pool[targets[pool] == d] for d in range(10)}
        if any(len(v) == 0 for v in by_class.values()):
            raise ValueError(f"split {split}: its pool of {len(pool)} source digits lacks a class; use "
                             "larger or fewer splits")
        recs = []
        for i in range(n):
            k = int(rng.choice(4, p=NUM_DIGITS_P)) + 1
            labels = sorted(rng.choice(10, size=k, replace=False, p=p).tolist())
            chosen = [images[int(rng.choice(by_class[d]))] for d in labels]
            buf = io.BytesIO()
            _mosaic(rng, chosen, image_size).save(buf, format="JPEG", quality=90)
            recs.append(Record(key=f"{split}_{i:06d}", pos=labels,
                               neg=[d for d in range(10) if d not in labels],
                               image_bytes=buf.getvalue()))
        out[split] = recs
    return out


def add_arguments(p) -> None:
    p.add_argument("--num-train", type=int, default=3000)
    p.add_argument("--num-val", type=int, default=500)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)


def build_spec(args, report):
    from .writer import BuildSpec

    sizes = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    records = make_records(sizes, image_size=args.image_size, seed=args.seed)
    return BuildSpec("digits", CLASSES, records,
                     source={"generator": "sklearn.datasets.load_digits mosaics", "image_size": args.image_size})

"""Tables laid out like the paper's (rows = methods, columns = settings) and plots."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from .linear import parse_setting

# The research's ResNet-50 448 numbers (docs/method.md#reference-numbers), shown only beside full COCO results.
PAPER = {"coco": {"fal": 81.1, "pal0.3": 65.6, "pal0.6": 76.3, "pal0.9": 81.0, "ppl0.3": 73.1,
                  "ppl0.6": 80.1, "ppl0.9": 83.6, "spl": 72.0}}


def cell_stats(rows: list[dict]) -> dict[tuple[str, str, str], tuple[float, float, int]]:
    """(dataset, method, setting) -> (mean, std, n) of test mAP in %."""
    acc: dict = defaultdict(list)
    for r in rows:
        acc[(r["dataset"], r["method"], r["setting"])].append(100 * float(r["test_map"]))
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in acc.items()}


def render_table(stats: dict, dataset: str, methods: list[str], settings: list[str]) -> str:
    best = {s: max((stats[(dataset, m, s)][0] for m in methods if (dataset, m, s) in stats), default=None)
            for s in settings}
    max_n = max((v[2] for k, v in stats.items() if k[0] == dataset), default=0)
    lines = [f"| {dataset} | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for m in methods:
        cells = []
        for s in settings:
            if (dataset, m, s) not in stats:
                cells.append("")
                continue
            mean, std, n = stats[(dataset, m, s)]
            text = f"{mean:.1f} +/- {std:.1f}" + (f" (n={n})" if n < max_n else "")
            cells.append(f"**{text}**" if best[s] is not None and mean == best[s] else text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if dataset in PAPER:
        lines.append("| paper (pml, ResNet-50 448) | " + " | ".join(f"{PAPER[dataset].get(s, '')}" for s in settings) + " |")
    return "\n".join(lines)


BASELINES = ("an", "asl", "wan")  # the baselines a default must beat in every partial cell (issue 18)


def leave_one_out(rows: list[dict], candidates: list[str], settings: list[str],
                  baselines: tuple[str, ...] = BASELINES, smoke: set[str] = frozenset()) -> list[dict]:
    """For each dataset: the candidate default chosen on the partial-label cells of every
    *other* dataset that is not a smoke test (validation mAP only, never test), then, per
    partial setting of the held-out dataset, that choice's mean test mAP against the best
    baseline's. The choice: the highest mean over those cells of the candidate's mean
    validation mAP divided by the best candidate's in the cell, so every cell weighs the same
    whatever its dataset's mAP scale (raw means let a dataset at 70 % outvote one at 10 %).
    Returns one dict per (held-out dataset, setting)."""
    val: dict = defaultdict(list)
    for r in rows:
        if r["setting"] != "fal":
            val[(r["dataset"], r["setting"], r["method"])].append(float(r["val_map"]))
    stats = cell_stats(rows)
    datasets = sorted({r["dataset"] for r in rows})
    out = []
    for held in datasets:
        relative: dict = defaultdict(list)
        for d in datasets:
            if d == held or d in smoke:
                continue
            for s in settings:
                means = {c: float(np.mean(val[(d, s, c)])) for c in candidates if val.get((d, s, c))}
                if len(means) == len(candidates) and max(means.values()) > 0:
                    for c, v in means.items():
                        relative[c].append(v / max(means.values()))
        if not relative:
            continue
        chosen = max(candidates, key=lambda c: float(np.mean(relative[c])))
        for s in settings:
            if s == "fal" or (held, chosen, s) not in stats:
                continue
            rivals = {b: stats[(held, b, s)][0] for b in baselines if (held, b, s) in stats}
            if not rivals:
                continue
            best = max(rivals, key=rivals.get)
            out.append({"held_out": held, "chosen": chosen, "setting": s, "chosen_test": stats[(held, chosen, s)][0],
                        "best_baseline": best, "baseline_test": rivals[best],
                        "margin": stats[(held, chosen, s)][0] - rivals[best]})
    return out


def render_leave_one_out(results: list[dict], settings: list[str]) -> str:
    if not results:
        return ""
    cols = [s for s in settings if s != "fal"]
    lines = ["| held out | chosen on the others | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    by_ds: dict = defaultdict(dict)
    for r in results:
        by_ds[(r["held_out"], r["chosen"])][r["setting"]] = r
    for (held, chosen), cells in by_ds.items():
        text = [f"{cells[s]['margin']:+.2f} ({cells[s]['best_baseline']})" if s in cells else "" for s in cols]
        lines.append(f"| {held} | {chosen} | " + " | ".join(text) + " |")
    won = sum(r["margin"] > 0 for r in results)
    lines += ["", f"Test mAP points of the chosen default minus the best of {', '.join(BASELINES)} in that "
                  f"cell (mean over seeds; that baseline in brackets): ahead in {won} of {len(results)} cells."]
    return "\n".join(lines)


def write_report(rows: list[dict], out: Path, methods: list[str], settings: list[str],
                 smoke: set[str] = frozenset(), screened: bool = False) -> None:
    stats = cell_stats(rows)
    datasets = sorted({r["dataset"] for r in rows})
    # Named variants stand beside the default; the ablation switches parts of pml-paper off.
    main_methods = [m for m in methods if not m.startswith("pml-paper-")]
    ablation = [m for m in methods if m.startswith("pml-paper")]
    seeds = sorted({r["seed"] for r in rows})
    parts = [f"Test mAP (%) at the epoch with the best validation mAP, mean +/- std over seeds "
             f"{', '.join(seeds)}; best mean per column in bold.", ""]
    for ds in datasets:
        parts += [f"## {ds}", "", render_table(stats, ds, main_methods, settings), ""]
        if screened:
            parts += [f"### {ds}: weight decay chosen on validation (per seed)", "",
                      render_chosen_weight_decay(rows, ds, main_methods, settings), ""]
        if len(ablation) > 1:
            parts += [f"### {ds}: ablation (paper Table VII)", "", render_table(stats, ds, ablation, settings), ""]
        _plots(stats, ds, main_methods, ablation, settings, out)
    candidates = [m for m in main_methods if m == "pml" or m.startswith("pml-")]
    lodo = render_leave_one_out(leave_one_out(rows, candidates, settings, smoke=smoke), settings)
    if lodo and len(datasets) > 1:
        parts += ["## Leave one dataset out", "",
                  f"The default is chosen among {', '.join(candidates)} on the partial-label cells of every other "
                  "dataset" + (f" ({', '.join(sorted(smoke))} are smoke tests: never used to choose)" if smoke else "")
                  + ": the highest mean of its validation mAP relative to the best candidate's in each cell; then "
                  "it is scored on the held-out dataset's test split.",
                  "", lodo, ""]
    (out / "table.md").write_text("\n".join(parts))


def render_chosen_weight_decay(rows: list[dict], ds: str, methods: list[str], settings: list[str]) -> str:
    chosen: dict = {}
    for r in sorted(rows, key=lambda r: int(r["seed"])):
        if r["dataset"] == ds and r.get("weight_decay"):
            chosen.setdefault((r["method"], r["setting"]), []).append(f"{float(r['weight_decay']):g}")
    lines = [f"| {ds} | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(" / ".join(chosen.get((m, s), ["-"])) for s in settings) + " |")
    return "\n".join(lines)


def _plots(stats, ds, methods, ablation, settings, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, kind in zip(axes, ("pal", "ppl")):
        cols = [s for s in settings if parse_setting(s)[0] == kind]
        if not cols:
            ax.axis("off")
            continue
        ratios = [parse_setting(s)[1] for s in cols]
        for m in methods:
            ys = [stats.get((ds, m, s), (np.nan,))[0] for s in cols]
            ax.plot(ratios, ys, marker="o", label=m, linewidth=2.5 if m == "pml" else 1)
        ax.set_title(f"{ds}: {kind.upper()}")
        ax.set_xlabel("label ratio")
        ax.set_ylabel("test mAP (%)")
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_lines():
            ax.legend(fontsize=7, ncol=2)
            break
    fig.tight_layout()
    fig.savefig(out / f"map_vs_ratio_{ds}.png")
    plt.close(fig)
    if len(ablation) > 1:
        fig, ax = plt.subplots(figsize=(10, 3.5), dpi=110)
        width = 0.8 / len(ablation)
        for k, m in enumerate(ablation):
            ys = [stats.get((ds, m, s), (np.nan,))[0] for s in settings]
            ax.bar(np.arange(len(settings)) + k * width, ys, width, label=m)
        ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, settings)
        ax.set_ylabel("test mAP (%)")
        ax.set_title(f"{ds}: ablation")
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        fig.savefig(out / f"ablation_{ds}.png")
        plt.close(fig)

"""The experiment harness: a 2 x 2 grid end to end on real features; the table comes from
the recorded runs; a rerun skips finished cells."""

from __future__ import annotations

import csv

import numpy as np

import pytest

from stream_pml.experiment import grid as grid_mod
from stream_pml.experiment.grid import main


@pytest.fixture
def grid_file(tmp_path, sample_data):
    f = tmp_path / "grid.yaml"
    f.write_text(f"""
datasets:
  - name: yeast
    kind: npz
    path: {sample_data / 'features/yeast/yeast.npz'}
methods: [pml, an]
settings: [pal0.3, spl]
seeds: [0, 1]
ablation: false
train:
  epochs: 3
out_dir: {tmp_path / 'out'}
""")
    return f


def test_two_by_two_grid_table_comes_from_the_recorded_runs(grid_file, tmp_path, monkeypatch):
    assert main(["--grid", str(grid_file)]) == 0
    out = tmp_path / "out"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2
    assert {(r["method"], r["setting"]) for r in rows} == {("pml", "pal0.3"), ("pml", "spl"),
                                                            ("an", "pal0.3"), ("an", "spl")}
    table = (out / "table.md").read_text()
    for method in ("pml", "an"):
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {method} |"))
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")[1:]]
        for setting, cell in zip(("pal0.3", "spl"), cells):
            vals = [100 * float(r["test_map"]) for r in rows if r["method"] == method and r["setting"] == setting]
            mean = sum(vals) / len(vals)
            assert cell.startswith(f"{mean:.1f} +/- "), (method, setting, cell)
    assert (out / "map_vs_ratio_yeast.png").is_file()
    # Rerun: every cell is finished, none is trained again.
    calls = []
    monkeypatch.setattr(grid_mod, "train_cell", lambda *a, **k: calls.append(a))
    assert main(["--grid", str(grid_file)]) == 0
    assert calls == []


def test_grid_config_errors_name_the_problem(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("datasets: [{name: x, path: y}]\nmethods: [nope]\n")
    assert main(["--grid", str(f)]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_protocol_runs_the_trainer_per_cell(digits_shards, tmp_path):
    f = tmp_path / "grid.yaml"
    f.write_text(f"""
datasets:
  - name: digits
    kind: trainer
    path: {digits_shards}
    overrides: [data.image_size=32, data.batch_size=8, data.num_threads=1, model.arch=mobilenet_v3_small,
                train.epochs=1, optim.lr=1e-3]
methods: [pml-paper-q1]
settings: [spl]
seeds: [0]
ablation: false
out_dir: {tmp_path / 'out'}
""")
    assert main(["--grid", str(f)]) == 0
    with open(tmp_path / "out" / "results.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["method"] == "pml-paper-q1" and 0 < float(row["test_map"]) <= 1
    cfg = (tmp_path / "out" / "runs" / "digits-pml-paper-q1-spl-s0" / "config.yaml").read_text()
    assert "q: 1.0" in cfg and "label_setting: spl" in cfg


def test_diagnose_writes_curves_and_ap_by_class_frequency(sample_data, tmp_path):
    from stream_pml.experiment.diagnose import frequency_buckets, main as diagnose_main

    out = tmp_path / "diag"
    assert diagnose_main(["--data", str(sample_data / "features/yeast/yeast.npz"), "--methods", "pml-paper", "an",
                          "--settings", "spl", "--epochs", "2", "--out", str(out)]) == 0
    curves = list(csv.DictReader(open(out / "curves.csv")))
    assert [(r["method"], r["epoch"]) for r in curves] == [("pml-paper", "1"), ("pml-paper", "2"),
                                                          ("an", "1"), ("an", "2")]
    pml_rows = [r for r in curves if r["method"] == "pml-paper"]  # the form with alpha/beta on
    assert all(0 < float(r["beta"]) < 1 and float(r["alpha"]) + float(r["beta"]) == 1 for r in pml_rows)
    assert all(r["alpha"] == r["pseudo_mean"] == "" for r in curves if r["method"] == "an")  # pml's only
    assert (out / "curves.png").stat().st_size > 0 and "rare third" in (out / "ap_by_frequency.md").read_text()
    freq = np.array([5, 1, 9, 3, 7, 2, 8])
    buckets = frequency_buckets(freq)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(7))
    assert freq[buckets[0]].max() <= freq[buckets[2]].min()


def test_grid_in_worker_processes_records_the_same_cells(grid_file, tmp_path):
    assert main(["--grid", str(grid_file)]) == 0
    assert main(["--grid", str(grid_file), "workers=2", f"out_dir={tmp_path / 'par'}"]) == 0

    def cells(path):
        with open(path / "results.csv") as f:
            return {(r["method"], r["setting"], r["seed"]): r["test_map"] for r in csv.DictReader(f)}

    assert cells(tmp_path / "par") == cells(tmp_path / "out")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_changed_default_reruns_only_its_cells_and_tables_never_mix_them(grid_file, tmp_path, monkeypatch):
    import dataclasses
    import json

    from stream_pml.losses import LOSSES

    args = ["--grid", str(grid_file), "seeds=[0]", "settings=[spl]"]
    assert main(args) == 0
    first = _rows(tmp_path / "out" / "results.csv")
    assert len(first) == 2 and all(r["commit"] and len(r["params_hash"]) == 12 for r in first)
    # One of pml's defaults changes: its cell is trained again, an's is not.
    monkeypatch.setitem(LOSSES, "pml", dataclasses.replace(LOSSES["pml"], defaults={"q": 0.5}))
    assert main(args) == 0
    rows = _rows(tmp_path / "out" / "results.csv")
    pml = [r for r in rows if r["method"] == "pml"]
    assert len(rows) == 3 and len(pml) == 2
    assert pml[0]["params_hash"] != pml[1]["params_hash"]
    assert [json.loads(r["loss_params"])["q"] for r in pml] == [1.0, 0.5]
    # The table shows the row of today's parameters, not the older one.
    line = next(ln for ln in (tmp_path / "out" / "table.md").read_text().splitlines() if ln.startswith("| pml |"))
    assert line.split("|")[2].strip().strip("*").startswith(f"{100 * float(pml[1]['test_map']):.1f}")


def test_rows_of_an_older_results_file_are_kept_and_trained_again(grid_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old_header = "dataset,method,setting,seed,val_map,test_map,best_epoch,setting_hash,seconds,final_pseudo_mean"
    (out / "results.csv").write_text(old_header + "\nyeast,an,spl,0,0.5,0.5,1,x,1.0,nan\n")
    assert main(["--grid", str(grid_file), "seeds=[0]", "settings=[spl]", "methods=[an]"]) == 0
    rows = _rows(out / "results.csv")
    assert len(rows) == 2 and rows[0]["params_hash"] == "" and rows[1]["params_hash"]


def test_leave_one_dataset_out_chooses_without_the_held_out_dataset():
    """The choice for a held-out dataset uses only the other datasets' validation mAP: here
    'pml-b' is best on validation everywhere except on C, where 'pml' is; held out, C still gets
    pml-b (chosen on A and B) and its margin is against the best of AN/ASL/WAN per cell."""
    from stream_pml.experiment.report import leave_one_out, render_leave_one_out

    val = {("A", "pml"): 0.3, ("A", "pml-b"): 0.5, ("B", "pml"): 0.3, ("B", "pml-b"): 0.5,
           ("C", "pml"): 0.9, ("C", "pml-b"): 0.1}
    test = {("C", "pml", "spl"): 0.40, ("C", "pml-b", "spl"): 0.20, ("C", "an", "spl"): 0.25,
            ("C", "wan", "spl"): 0.30, ("C", "asl", "spl"): 0.10}
    rows = []
    for ds in "ABC":
        for m in ("pml", "pml-b", "an", "asl", "wan"):
            for setting in ("fal", "spl"):
                for seed in (0, 1):
                    # fal's validation must not count: it would favour pml everywhere.
                    v = 0.99 if (setting == "fal" and m == "pml") else val.get((ds, m), 0.0)
                    rows.append({"dataset": ds, "method": m, "setting": setting, "seed": str(seed),
                                 "val_map": str(v), "test_map": str(test.get((ds, m, setting), 0.05))})
    got = {(r["held_out"], r["setting"]): r for r in leave_one_out(rows, ["pml", "pml-b"], ["fal", "spl"])}
    assert set(got) == {("A", "spl"), ("B", "spl"), ("C", "spl")}  # fal is not a partial cell
    c = got[("C", "spl")]
    assert c["chosen"] == "pml-b" and c["best_baseline"] == "wan"
    assert c["margin"] == pytest.approx(100 * (0.20 - 0.30))
    # A held out: chosen on B and C, where pml's mean validation (0.6) beats pml-b's (0.3).
    assert got[("A", "spl")]["chosen"] == "pml"
    table = render_leave_one_out(list(got.values()), ["fal", "spl"])
    assert "| C | pml-b | -10.00 (wan) |" in table
    # B a smoke test: C held out is chosen on A alone (pml-b); A held out on C alone (pml).
    got = {(r["held_out"], r["setting"]): r for r in leave_one_out(rows, ["pml", "pml-b"], ["fal", "spl"], smoke={"B"})}
    assert got[("C", "spl")]["chosen"] == "pml-b" and got[("A", "spl")]["chosen"] == "pml"
    assert got[("B", "spl")]["chosen"] == "pml"  # a smoke test is still held out and scored: A + C


def test_report_only_rebuilds_the_tables_and_trains_nothing(grid_file, tmp_path, monkeypatch):
    assert main(["--grid", str(grid_file), "seeds=[0]"]) == 0
    out = tmp_path / "out"
    (out / "table.md").unlink()

    def no_training(*a, **k):
        raise AssertionError("--report-only trained a cell")

    monkeypatch.setattr(grid_mod, "train_cell", no_training)
    # A seed with no rows yet: left out of the table, not trained.
    assert main(["--grid", str(grid_file), "seeds=[0,1]", "--report-only"]) == 0
    table = (out / "table.md").read_text()
    assert "| pml |" in table and "seeds 0;" in table


def test_weight_decay_screen_keeps_the_value_validation_prefers(grid_file, tmp_path, monkeypatch):
    """Each cell trains once per screened value; the row is the run with the best validation
    mAP (never test) and names its value; screened cells are other cells than unscreened ones."""
    calls = []

    def fake_cell(data, method, setting, seed, *, weight_decay, **kw):
        calls.append((method, setting, seed, weight_decay))
        # validation prefers 1e-2 for pml and 1e-4 for an; test says the opposite
        good = weight_decay == (1e-2 if method == "pml" else 1e-4)
        return {"method": method, "setting": setting, "seed": seed, "val_map": 0.5 if good else 0.4,
                "test_map": 0.3 if good else 0.6, "best_epoch": 1, "setting_hash": "h", "seconds": 0.0,
                "final_pseudo_mean": 0.5}

    monkeypatch.setattr(grid_mod, "train_cell", fake_cell)
    args = ["--grid", str(grid_file), "seeds=[0]", "settings=[spl]"]
    assert main(args) == 0
    assert main(args + ["train.weight_decay_screen=[1e-4,1e-3,1e-2]"]) == 0
    rows = _rows(tmp_path / "out" / "results.csv")
    assert len(rows) == 4 and len(calls) == 2 + 2 * 3
    screened = {r["method"]: r for r in rows[2:]}
    assert float(screened["pml"]["weight_decay"]) == 1e-2 and float(screened["an"]["weight_decay"]) == 1e-4
    assert all(float(r["test_map"]) == 0.3 for r in screened.values())
    assert {r["params_hash"] for r in rows[:2]}.isdisjoint({r["params_hash"] for r in rows[2:]})
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| pml | 0.01 |" in table and "| an | 0.0001 |" in table


def test_unscreened_cells_keep_their_hash_and_screened_ones_ignore_the_single_value(grid_file):
    """Adding the screen must not make every existing results row look stale."""
    from stream_pml.experiment.grid import cell_params, load_grid

    plain = load_grid(str(grid_file))
    train = cell_params(plain, plain.datasets[0], "an")["train"]
    assert "weight_decay_screen" not in train and train["weight_decay"] == 1e-4
    screened = load_grid(str(grid_file), ["train.weight_decay_screen=[1e-4,1e-2]"])
    a = cell_params(screened, screened.datasets[0], "an")["train"]
    b = cell_params(load_grid(str(grid_file), ["train.weight_decay_screen=[1e-4,1e-2]", "train.weight_decay=0.5"]),
                    screened.datasets[0], "an")["train"]
    assert a == b and "weight_decay" not in a


def test_a_cell_is_the_data_it_reads_not_the_path_it_was_read_from(grid_file, sample_data, tmp_path):
    """Moving a data set keeps its results current; other bytes at the same path do not."""
    import dataclasses
    import shutil

    from stream_pml.experiment.grid import cell_params, load_grid, params_hash

    cfg = load_grid(str(grid_file))

    def hash_at(path):
        return params_hash(cell_params(cfg, dataclasses.replace(cfg.datasets[0], path=str(path)), "pml"))

    moved = tmp_path / "elsewhere" / "y.npz"
    moved.parent.mkdir()
    shutil.copy(sample_data / "features/yeast/yeast.npz", moved)
    assert hash_at(moved) == hash_at(sample_data / "features/yeast/yeast.npz")
    shutil.copy(sample_data / "features/scene/scene.npz", moved)
    assert hash_at(moved) != hash_at(sample_data / "features/yeast/yeast.npz")

"""stream-pml evaluate / predict / export on a tiny trained run."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch

from stream_pml.cli import main as cli
from stream_pml.train import main as train_main

from .conftest import tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(digits_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("inference") / "run"
    assert train_main(tiny_overrides(digits_shards, run, **{"train.epochs": 2})) == 0
    return run


def test_evaluate_matches_the_trainers_test_and_writes_reports(trained, digits_shards, tmp_path):
    out = tmp_path / "eval"
    assert cli(["evaluate", "--checkpoint", str(trained), "--shards", str(digits_shards),
                "--split", "test", "--out", str(out)]) == 0
    from stream_pml.inference import evaluation_name

    tag = evaluation_name(digits_shards, "test")
    assert tag.startswith("digits-") and tag.endswith("_test")
    result = json.loads((out / f"evaluation_{tag}.json").read_text())
    recorded = json.loads((trained / "metrics.json").read_text())["test"]
    assert result["map"] == pytest.approx(recorded["map"], abs=1e-6)
    assert result["num_images"] == 40
    table = (out / f"per_class_ap_{tag}.csv").read_text()
    header, *rows = table.splitlines()
    assert header == "class_id,name,verified_positives,verified_negatives,ap"
    assert [r.split(",")[1] for r in rows] == [f"digit_{d}" for d in range(10)]
    # Every test image is labelled for every class (digits is fully labelled).
    assert all(int(r.split(",")[2]) + int(r.split(",")[3]) == 40 for r in rows)
    assert (out / f"per_class_ap_{tag}.png").stat().st_size > 1000
    # The trainer's final test wrote the same table into the run directory.
    assert (trained / "evaluation" / f"per_class_ap_{tag}.csv").read_text() == table
    md = (out / f"evaluation_{tag}.md").read_text()
    assert f"mAP **{100 * result['map']:.2f} %** over the" in md


def _images(digits_shards, folder, n=3):
    folder.mkdir()
    with tarfile.open(digits_shards / "test-000000.tar") as tar:
        jpgs = [m for m in tar if m.name.endswith(".jpg")][:n]
        for k, m in enumerate(jpgs):
            (folder / f"img{k}.jpg").write_bytes(tar.extractfile(m).read())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")


def test_predict_reports_corrupt_images_and_uses_calibrated_thresholds(trained, digits_shards, tmp_path, capsys):
    _images(digits_shards, tmp_path / "imgs")
    out = tmp_path / "pred.jsonl"
    assert cli(["predict", "--checkpoint", str(trained), "--folder", str(tmp_path / "imgs"),
                "--out", str(out), "--threshold", "0.0"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4
    broken = [r for r in records if r["image"].endswith("broken.jpg")]
    assert broken and broken[0]["error"]
    ok = [r for r in records if "error" not in r]
    assert all(len(r["labels"]) == 10 and r["scores"] == sorted(r["scores"], reverse=True) for r in ok)
    assert "skipping" in capsys.readouterr().err
    best = torch.load(trained / "best.pt", weights_only=False)
    assert len(best["thresholds"]) == 10
    csv_out = tmp_path / "pred.csv"
    assert cli(["predict", "--checkpoint", str(trained), "--folder", str(tmp_path / "imgs"),
                "--out", str(csv_out), "--threshold", "calibrated"]) == 0
    assert csv_out.read_text().splitlines()[0] == "image,labels,scores,error"


def test_export_gives_the_same_scores_as_pytorch(trained, tmp_path):
    from safetensors.torch import load_file

    from stream_pml.inference import load_model
    from stream_pml.model import ModelConfig, build_model

    out = tmp_path / "export"
    assert cli(["export", "--checkpoint", str(trained), "--out", str(out)]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["num_classes"] == 10 and meta["input"]["size"] == [32, 32]
    lm = load_model(trained)
    fresh = build_model(ModelConfig(arch=meta["arch"]), meta["num_classes"]).eval()
    fresh.load_state_dict(load_file(str(out / "model.safetensors")))
    program = torch.export.load(str(out / "model.pt2")).module()
    x = torch.randn(5, 3, 32, 32)  # another batch size than the export's sample
    with torch.no_grad():
        ref = lm.model(x)
        assert torch.allclose(fresh(x), ref, atol=1e-5)
        assert torch.allclose(program(x), ref, atol=1e-4)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.pt2", "model.safetensors"]


def test_predict_over_a_shard_split_names_samples_by_key(trained, digits_shards, tmp_path):
    out = tmp_path / "pred.jsonl"
    assert cli(["predict", "--checkpoint", str(trained), "--shards", str(digits_shards), "--split", "val",
                "--out", str(out)]) == 0
    names = [json.loads(line)["image"] for line in out.read_text().splitlines()]
    assert sorted(names) == sorted((digits_shards / "val.keys.txt").read_text().split())


def test_train_experiment_and_demo_subcommands(digits_shards, tmp_path, sample_data):
    run = tmp_path / "run"
    assert cli(["train", *tiny_overrides(digits_shards, run)]) == 0
    assert (run / "metrics.json").is_file()
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"datasets: [{{name: yeast, kind: npz, path: {sample_data / 'features/yeast/yeast.npz'}}}]\n"
                    f"methods: [an]\nsettings: [spl]\nseeds: [0]\nablation: false\n"
                    f"train: {{epochs: 1}}\nout_dir: {tmp_path / 'grid'}\n")
    assert cli(["experiment", "--grid", str(grid)]) == 0
    assert (tmp_path / "grid" / "table.md").is_file()
    demo = tmp_path / "demo_run"
    assert cli(["demo", "--data", str(tmp_path / "digits"), "train.epochs=1", f"train.run_dir={demo}",
                "data.image_size=32"]) == 0
    assert (tmp_path / "digits" / "manifest.json").is_file() and (demo / "best.pt").is_file()


def test_predict_flags_are_checked_by_name_and_nothing_read_is_an_error(trained, tmp_path, capsys):
    for flag, value, said in (("--threshold", "abc", "argument --threshold: 'abc' is not a number"),
                              ("--threshold", "1.5", "argument --threshold: '1.5' is not a number"),
                              ("--out", str(tmp_path / "x.txt"), "argument --out: ")):
        with pytest.raises(SystemExit) as exc:
            cli(["predict", "--checkpoint", str(trained), "--out", str(tmp_path / "p.jsonl"), flag, value,
                 str(tmp_path / "any.jpg")])
        assert exc.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "p.jsonl"
    assert cli(["predict", "--checkpoint", str(trained), "--out", str(out), str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("stream-pml predict: error: none of the 1 images could be read")
    assert json.loads(out.read_text())["error"]  # the reason stays on record

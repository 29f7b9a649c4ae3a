"""Config files and overrides fail before any work, naming the key."""

from __future__ import annotations

import pytest

from stream_pml.config import ConfigError, load_config
from stream_pml.train import main


def test_defaults_then_file_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 0.5\ntrain:\n  epochs: 3\n")
    cfg = load_config(str(f), ["optim.lr=0.25"])
    assert cfg.optim.lr == 0.25 and cfg.train.epochs == 3 and cfg.model.arch == "resnet50"


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("train.epochs=many", "train.epochs"),
    ("nosection.x=1", "nosection"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_typo_in_yaml_names_the_key(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("data:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"data\.batchsize"):
        load_config(str(f))


@pytest.mark.parametrize("override, field", [
    ("data.label_setting=xal", "data.label_setting"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.name=sgd", "optim.name"),
    ("loss.name=nope", "loss.name"),
    ("+loss.params.gama=0.1", "loss.params.gama"),
    ("model.arch=resnet5000", "model.arch"),
])
def test_invalid_value_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override.lstrip("+")])


def test_main_reports_config_error_before_any_work(tmp_path, capsys):
    assert main([f"train.run_dir={tmp_path / 'run'}", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_shard_directory_is_named(tmp_path, capsys):
    missing = tmp_path / "no_shards"
    assert main([f"data.shards={missing}", f"train.run_dir={tmp_path / 'run'}"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_shipped_run_files_load():
    from .conftest import REPO

    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(str(path))


def test_print_config_resolves_the_open_images_recipe_without_training(tmp_path, capsys):
    from omegaconf import OmegaConf

    from .conftest import REPO

    run = tmp_path / "run"
    recipe = str(REPO / "configs" / "openimages.yaml")
    assert main(["--config", recipe, f"train.run_dir={run}", "optim.lr=4e-4", "--print-config"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    cfg = load_config(recipe, [f"train.run_dir={run}", "optim.lr=4e-4"])
    assert OmegaConf.to_container(printed) == OmegaConf.to_container(OmegaConf.structured(cfg))
    assert printed.optim.lr == 4e-4 and printed.model.arch == "resnet50" and printed.data.image_size == 448
    assert printed.train.checkpoint_minutes == 30 and printed.data.val_split == "validation"
    assert not run.exists(), "nothing was started"
    # A typo is still refused, before printing anything.
    assert main(["--config", recipe, "train.checkpoint_minute=5", "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "train.checkpoint_minute" in captured.err


def test_a_run_from_before_a_key_existed_resumes_when_the_key_keeps_its_default():
    """A checkpoint whose config lacks a key added since (train.ema_decay) trained as the
    default does; any other value for it is a change and refused."""
    from stream_pml.checkpoint import ResumeError
    from stream_pml.config import to_dict
    from stream_pml.states import RunIdentity

    old = to_dict(load_config(None, ["data.shards=x"]))
    del old["train"]["ema_decay"]
    saved = RunIdentity(old, 1, "m", ["a"]).state_dict()
    RunIdentity(to_dict(load_config(None, ["data.shards=x"])), 1, "m", ["a"]).load_state_dict(saved)
    with pytest.raises(ResumeError, match="train.ema_decay was '<absent>', now 0.9"):
        RunIdentity(to_dict(load_config(None, ["data.shards=x", "train.ema_decay=0.9"])), 1, "m",
                    ["a"]).load_state_dict(saved)

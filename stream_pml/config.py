"""The root run configuration: defaults < YAML run file < dotted CLI overrides.

Each part is a typed dataclass defined next to the code it configures; this module only
composes them. OmegaConf's structured configs reject unknown keys and wrongly typed values
with the full dotted key in the message, before any work starts; ``__post_init__`` checks
ranges. The resolved config is saved in the run directory.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data.config import DataConfig
from .losses import LossConfig
from .model import ModelConfig
from .optim import OptimConfig
from .pseudo_store import PseudoConfig
from .trainer import TrainConfig


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """A config file or override that names an unknown key or a value of the wrong type."""


def _did_you_mean(key: str | None) -> str:
    import difflib

    if not key:
        return ""
    known = [k for k in _flat_keys(OmegaConf.to_container(OmegaConf.structured(Config)))]
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close and close[0] != key else ""


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def _load_yaml(path: str):
    import yaml

    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        raise ConfigError(f"{where}: YAML syntax error: {getattr(exc, 'problem', None) or exc}") from None


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist")
            file_cfg = _load_yaml(path)
            if file_cfg is None or not OmegaConf.is_dict(file_cfg):
                raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, ...)")
            if not file_cfg:  # the defaults alone are not a run (ResNet-50, 448 px, 20 epochs)
                raise ConfigError(f"{path}: the run file is empty; say at least where the shards are "
                                  "(data.shards) and what to train (see configs/demo.yaml)")
            layers.append(file_cfg)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        where = f" (in {path} or the overrides)" if path else ""
        key = getattr(exc, "full_key", None)
        # OmegaConf appends its internals (full_key, reference_type, ...) on later lines.
        text = str(exc.msg if hasattr(exc, "msg") else exc).splitlines()[0]
        raise ConfigError(f"config key {key!r}{where}: {text}{_did_you_mean(key)}") from None
    except ValueError as exc:  # __post_init__ range checks
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from None
    assert isinstance(cfg, Config)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]

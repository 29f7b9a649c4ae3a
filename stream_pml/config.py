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


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist")
            file_cfg = OmegaConf.load(path)
            if file_cfg is None or not OmegaConf.is_dict(file_cfg):
                raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, ...)")
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
        raise ConfigError(f"config key {key!r}{where}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
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

"""Hydra/OmegaConf configuration: a dataclass schema plus YAML, overridable on every command."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from configs.schema import Config

CONFIG_DIR = Path(__file__).resolve().parent
ConfigStore.instance().store(name="schema", node=Config)


def load_config(overrides: Sequence[str] = (), config_name: str = "pose_service") -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    cfg.state_dir = os.path.abspath(os.path.expanduser(cfg.state_dir))
    if not cfg.runtime_dir:
        cfg.runtime_dir = os.path.join(cfg.state_dir, "run")
    cfg.runtime_dir = os.path.abspath(os.path.expanduser(cfg.runtime_dir))
    cfg.storage_dir = os.path.abspath(os.path.expanduser(cfg.storage_dir or cfg.state_dir))
    return cfg


def uploads_dir(cfg: DictConfig) -> str:
    return os.path.join(cfg.storage_dir, "uploads")


def video_roots(cfg: DictConfig) -> list[str]:
    """Where job videos may be read from: the configured roots and the service's own uploads."""
    return [*cfg.jobs.allowed_roots, uploads_dir(cfg)]


def results_dir(cfg: DictConfig) -> str:
    return os.path.join(cfg.storage_dir, "results")


def ledger_path(cfg: DictConfig) -> str:
    """The SQLite ledger (used when ledger.url is unset)."""
    return os.path.join(cfg.state_dir, "ledger.sqlite3")


def rungs(cfg: DictConfig) -> list[dict]:
    """The fallback ladder, top rung first."""
    if cfg.ladder:
        return [OmegaConf.to_container(r, resolve=True) for r in cfg.ladder]
    device = "cpu" if cfg.engine.device == "auto" else cfg.engine.device
    return [{"engine": cfg.engine.name, "device": device,
             "options": OmegaConf.to_container(cfg.engine.options, resolve=True)}]


def dump_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Hand a resolved config to a child process (the worker reads it back with read_config)."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)


def read_config(path: str | os.PathLike) -> DictConfig:
    schema = OmegaConf.structured(Config)
    return OmegaConf.merge(schema, OmegaConf.load(path))

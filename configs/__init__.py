"""Hydra/OmegaConf configuration: a dataclass schema plus YAML, overridable on every command."""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Sequence, cast

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.schema import Config, RungConfig

CONFIG_DIR = Path(__file__).resolve().parent
ConfigStore.instance().store(name="schema", node=Config)


class ConfigError(ValueError):
    """An operator's mistake in an override, said in one line."""


def load_config(overrides: Sequence[str] = (), config_name: str = "pose_service") -> Config:
    """-> the composed config; ConfigError (one line naming the override) for an operator's mistake."""
    unknown = unknown_key(overrides)
    if unknown:
        raise ConfigError(unknown)
    try:
        cfg = _compose(config_name, overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(explain(overrides, exc, config_name)) from None
    cfg.state_dir = os.path.abspath(os.path.expanduser(cfg.state_dir))
    if not cfg.runtime_dir:
        cfg.runtime_dir = os.path.join(cfg.state_dir, "run")
    cfg.runtime_dir = os.path.abspath(os.path.expanduser(cfg.runtime_dir))
    cfg.storage_dir = os.path.abspath(os.path.expanduser(cfg.storage_dir or cfg.state_dir))
    return cast(Config, cfg)  # a structured config: reads like the schema's dataclass


def _compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def _key_value(override: str) -> tuple[str, str]:
    key, _, value = override.lstrip("+~").partition("=")
    return key, value


def unknown_key(overrides: Sequence[str]) -> str:
    """An override naming no key of the schema (Hydra would accept a `+key` silently), with the
    closest valid key."""
    schema = OmegaConf.structured(Config)
    for override in overrides:
        key, _ = _key_value(override)
        if key.startswith("hydra.") or _known(schema, key):
            continue
        close = difflib.get_close_matches(key, sorted(_dotted_keys(schema)), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown config key {key!r}{hint}; every key is listed in configs/schema.py"
    return ""


def explain(overrides: Sequence[str], exc: Exception, config_name: str = "pose_service") -> str:
    """Which override Hydra refused and why: a new key in a free-form mapping written without `+`,
    or a value of the wrong type (with the type expected)."""
    schema = OmegaConf.structured(Config)
    defaults = _compose(config_name, [])
    for override in overrides:
        key, value = _key_value(override)
        if override.startswith("~") and not _under_mapping(schema, key):
            return f"{key} cannot be removed (every schema key has a value); set it instead: {key}=..."
        if not override.startswith(("+", "~")) and OmegaConf.select(defaults, key, default=None) is None \
                and _under_mapping(schema, key):
            return f"{key} is not set by default: add it with +{key}={value}"
        problem = _bad_value(schema, key, value)
        if problem:
            return f"{key}={value!r}: {problem}"
    return f"configuration error: {str(exc).splitlines()[0]}"


def _under_mapping(schema: DictConfig, key: str) -> bool:
    parent = key.rpartition(".")[0]
    node = OmegaConf.select(schema, parent, default=None) if parent else None
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict


def _dotted_keys(node, prefix: str = "") -> set[str]:
    keys = set()
    for name in node.keys():
        full = f"{prefix}{name}"
        keys.add(full)
        child = OmegaConf.select(node, name)
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) is not dict:
            keys |= _dotted_keys(child, f"{full}.")
    return keys


def _known(schema: DictConfig, key: str) -> bool:
    """A schema key, or any key under a free-form mapping (engine.options, deadlines.stages)."""
    parts = key.split(".")
    node = schema
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return False
        if OmegaConf.get_type(node) is dict and depth > 0:
            return True
        if part not in node:
            return False
        node = OmegaConf.select(node, part)
    return True


def _bad_value(schema: DictConfig, key: str, value: str) -> str:
    probe = OmegaConf.structured(Config)
    try:
        OmegaConf.update(probe, key, yaml_value(value), force_add=True)
    except (OmegaConfBaseException, ValueError) as exc:
        expected = _expected_type(schema, key)
        return f"expected {expected}" if expected else str(exc).splitlines()[0]
    return ""


def _expected_type(schema: DictConfig, key: str) -> str:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(schema, parent) if parent else schema
    try:
        kind = OmegaConf.get_type(node, leaf) if isinstance(node, DictConfig) else None
    except (OmegaConfBaseException, KeyError):
        kind = None
    if kind is None:
        return ""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list like [a,b]"}
    return names.get(kind, getattr(kind, "__name__", ""))


def yaml_value(text: str):
    import yaml
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return text


def uploads_dir(cfg: Config) -> str:
    return os.path.join(cfg.storage_dir, "uploads")


def video_roots(cfg: Config) -> list[str]:
    """Where job videos may be read from: the configured roots and the service's own uploads."""
    return [*cfg.jobs.allowed_roots, uploads_dir(cfg)]


def results_dir(cfg: Config) -> str:
    return os.path.join(cfg.storage_dir, "results")


def ledger_path(cfg: Config) -> str:
    """The SQLite ledger (used when ledger.url is unset)."""
    return os.path.join(cfg.state_dir, "ledger.sqlite3")


def ledger_location(cfg: Config) -> str:
    """The ledger as one string, for open_ledger_at and child processes: the database URL, or the
    SQLite file in the state dir."""
    return str(cfg.ledger.url or ledger_path(cfg))


def rungs(cfg: Config) -> list[dict]:
    """The fallback ladder, top rung first."""
    if cfg.ladder:
        return [_rung_dict(r) for r in cfg.ladder]
    device = "cpu" if cfg.engine.device == "auto" else cfg.engine.device
    return [{"engine": cfg.engine.name, "device": device,
             "options": OmegaConf.to_container(cfg.engine.options, resolve=True)}]


def _rung_dict(node: RungConfig) -> dict:
    rung = OmegaConf.to_container(node, resolve=True)
    if not isinstance(rung, dict):  # a RungConfig node (configs/schema.py) always gives a dict
        raise ConfigError(f"a ladder rung must be a mapping, not {rung!r}")
    return rung


def with_fault(cfg: Config, kind: str, at: str, times: int) -> Config:
    """A copy of `cfg` with a fault armed (a drill): the service's own config is left as it is."""
    armed = copy.deepcopy(cfg)
    armed.fault.kind, armed.fault.at, armed.fault.times = kind, at, times
    return armed


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Hand a resolved config to a child process (the worker reads it back with read_config)."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)


def fault_settings(cfg: Config) -> dict:
    """The armed fault as a plain dict ({} when none is set): what the engines' FaultPlan takes."""
    if not cfg.fault.kind:
        return {}
    settings = OmegaConf.to_container(cast(DictConfig, cfg.fault), resolve=True)
    return settings if isinstance(settings, dict) else {}


def read_config(path: str | os.PathLike) -> Config:
    schema = OmegaConf.structured(Config)
    cfg = OmegaConf.merge(schema, OmegaConf.load(os.fspath(path)))
    if not isinstance(cfg, DictConfig):  # merged onto the schema (a DictConfig), it always is one
        raise ConfigError(f"{os.fspath(path)}: not a configuration mapping")
    return cast(Config, cfg)

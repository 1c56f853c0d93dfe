"""The HMR2 checkpoint as the release ships it, a whole Lightning 1.x checkpoint (hyper_parameters
holding the yacs config, callbacks, loops, optimizer states), read by each reader in the project the
way Lightning reads it: the engine's main_model stage (the real HMR2.load_from_checkpoint) and the
weights check shared by the engine's weights stage and `models verify`."""
from __future__ import annotations

import contextlib
import enum
import importlib
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import option_overrides
from synthetic import CHECKPOINT_EVERY_N_STEPS

from gpu_worker.engines import hmr2_assets
from gpu_worker.errors import WeightsMissing

from support import REPO

THROUGH_MAIN_MODEL = ["runtime", "weights", "main_model"]
LEGACY_ENUM_MODULE = "pytorch_lightning.utilities.enums"


def read_checkpoint(path: str) -> dict[str, Any]:
    import torch
    return torch.load(path, map_location="cpu", weights_only=False)


def run_stages(options: dict[str, Any], names: list[str], monkeypatch) -> Any:
    """An engine's first load stages, in this process; the cache variables they set are put back after."""
    from gpu_worker.engines.hmr2_phalp import HMR2PhalpEngine

    for var in ("HOME", "TORCH_HOME", "FVCORE_CACHE"):
        monkeypatch.setenv(var, os.environ[var])
    engine = HMR2PhalpEngine("cpu", options)
    stages = {stage.name: stage for stage in engine.stages()}
    for name in names:
        stages[name].run()
    return engine


@contextlib.contextmanager
def importable_while_saving(cls: type) -> Iterator[None]:
    """pickle saves a class by reference (module and name); this one can be found there only inside
    the block, so the file refers to a class that loading it later cannot import."""
    module = sys.modules.get(cls.__module__)
    created = module is None
    if module is None:
        module = sys.modules[cls.__module__] = types.ModuleType(cls.__module__)
    setattr(module, cls.__qualname__, cls)
    try:
        yield
    finally:
        delattr(module, cls.__qualname__)
        if created:
            del sys.modules[cls.__module__]


def cache_home_with_checkpoint(cache, root: Path, checkpoint: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """Engine options for a cache home holding the session cache's files (links) but another HMR2
    checkpoint; -> (options, that checkpoint's path)."""
    import torch

    home = root / "home"
    paths = cache.paths()
    for name, path in paths.items():
        if not Path(path).is_relative_to(cache.home) or name == "hmr2_checkpoint":
            continue
        link = home / Path(path).relative_to(cache.home)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    target = home / Path(paths["hmr2_checkpoint"]).relative_to(cache.home)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return cache.options(cache_home=str(home), hmr2_cpu_runtime="torch"), target


def test_the_synthetic_checkpoint_is_shaped_like_the_release(cache):
    """Guards the fixture: Lightning's own migrations recognise it as a 1.x file and bring it to the
    installed Lightning's layout (callback state key of train.py's ModelCheckpoint, the loops)."""
    import pytorch_lightning as pl
    import torch
    from packaging.version import Version
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.utilities.migration import migrate_checkpoint
    from yacs.config import CfgNode

    path = cache.paths()["hmr2_checkpoint"]
    # torch's default since 2.6 refuses it, as it refuses the release: each reader passes weights_only=False
    with pytest.raises(pickle.UnpicklingError, match="yacs.config.CfgNode"):
        torch.load(path, map_location="cpu")
    state = read_checkpoint(path)
    assert {"state_dict", "hyper_parameters", "hparams_name", "callbacks", "loops", "optimizer_states",
            "lr_schedulers", "epoch", "global_step", "pytorch-lightning_version"} <= set(state)
    assert Version(state["pytorch-lightning_version"]) < Version("2")
    assert isinstance(state["hyper_parameters"]["cfg"], CfgNode)
    assert state["optimizer_states"] and all("param_groups" in s for s in state["optimizer_states"])

    migrated, applied = migrate_checkpoint(state)
    assert {"1.9.0", "2.0.0"} <= set(applied)
    train_py_callback = ModelCheckpoint(every_n_train_steps=CHECKPOINT_EVERY_N_STEPS, save_last=True, save_top_k=1)
    assert list(migrated["callbacks"]) == [train_py_callback.state_key]
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    for name, loop in (("fit_loop", trainer.fit_loop), ("validate_loop", trainer.validate_loop),
                       ("test_loop", trainer.test_loop), ("predict_loop", trainer.predict_loop)):
        # Lightning 2's migrations leave the fit loop's validation loop in its 1.x layout
        expected = {key for key in loop.state_dict() if not key.startswith("epoch_loop.val_loop.")}
        found = {key for key in migrated["loops"][name] if not key.startswith("epoch_loop.val_loop.")}
        assert found == expected, name


def test_the_engine_loads_it_into_the_real_hmr2(cache, monkeypatch):
    import torch
    from hmr2.models import HMR2

    engine = run_stages(cache.options(hmr2_cpu_runtime="torch"), THROUGH_MAIN_MODEL, monkeypatch)
    assert isinstance(engine._hmr2, HMR2)
    saved = read_checkpoint(cache.paths()["hmr2_checkpoint"])["state_dict"]
    loaded = engine._hmr2.state_dict()
    for key in ("backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight", "smpl_head.deccam.weight"):
        assert torch.equal(loaded[key], saved[key]), key


def test_models_verify_passes_it(cache, tmp_path):
    overrides = ["engine.name=hmr2_phalp", "engine.device=cpu", f"state_dir={tmp_path / 'state'}",
                 *option_overrides(cache.options())]
    proc = subprocess.run([sys.executable, "-m", "pose_service.cli", "models", "verify", "--json", *overrides],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.stdout, proc.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(proc.stdout)["files"]}
    assert rows["hmr2_checkpoint"]["status"] == "present", rows["hmr2_checkpoint"]


def test_a_class_lightning_removed_is_read_as_lightning_reads_it(cache, tmp_path, monkeypatch):
    """Lightning 2 removed _FaultTolerantMode, which 1.x checkpoints could pickle; load_from_checkpoint
    reads them under pl_legacy_patch, which restores it. The weights check must read them so too."""
    legacy = enum.Enum("_FaultTolerantMode", [("DISABLED", "disabled")], module=LEGACY_ENUM_MODULE,
                       qualname="_FaultTolerantMode")
    assert not hasattr(importlib.import_module(LEGACY_ENUM_MODULE), "_FaultTolerantMode")
    state = read_checkpoint(cache.paths()["hmr2_checkpoint"])
    state["loops"]["fit_loop"]["state_dict"]["_fault_tolerant_mode"] = legacy.DISABLED
    with importable_while_saving(legacy):
        options, path = cache_home_with_checkpoint(cache, tmp_path, state)
    monkeypatch.setattr("hmr2.models.DEFAULT_CHECKPOINT", str(path))

    engine = run_stages(options, THROUGH_MAIN_MODEL, monkeypatch)  # the weights check, then Lightning
    assert engine._hmr2 is not None


@pytest.mark.parametrize("module, name", [("hmr2_retired_module", "HMR2Config"), ("yacs.config", "RetiredNode")],
                         ids=["missing-module", "missing-class"])
def test_a_class_nothing_defines_is_named(cache, tmp_path, monkeypatch, module, name):
    missing = type(name, (), {"__module__": module, "__qualname__": name})
    state = read_checkpoint(cache.paths()["hmr2_checkpoint"])
    state["callbacks"]["RetiredCallback"] = {"config": missing()}
    with importable_while_saving(missing):
        options, _ = cache_home_with_checkpoint(cache, tmp_path, state)

    row = hmr2_assets.verify([a for a in hmr2_assets.hmr2_assets({"HOME": str(tmp_path / "home")})
                              if a.name == "hmr2_checkpoint"])[0]
    assert row["status"] == "unreadable_here"  # not "truncated" nor "invalid": the file is not at fault
    assert f"the class {module}.{name}, which this Python environment cannot import" in row["problem"]
    assert "download" not in hmr2_assets.describe_problems([row])
    with pytest.raises(WeightsMissing, match=rf"hmr2_checkpoint: .*the class {module}\.{name}, which"):
        run_stages(options, ["runtime", "weights"], monkeypatch)

"""A synthetic hmr2_phalp cache for the upstream tier: every file the engine and `models verify`
read, with the keys and shapes of the released files, made of random numbers by the real
upstream classes (HMR2, PHALP's HMAR, its pose transformer, detectron2's ViTDet and RegNetY) at small
sizes.

A TEST FIXTURE: nothing here is, or stands in for, the released weights or the SMPL body model.
A random network's outputs mean nothing; what the tier checks is that every key, shape, device
and code path of the real code fits the engine (a weight's value changes none of them).

The models are small so the CPU runs them in seconds: HMR2's ViT is narrow and shallow (the model
config names its size, see hmr2_phalp.backbone_sized_by), ViTDet reads 256-px images with a small
ViT and few proposals (the engine option detector_overrides), the pose transformer is narrow.
HMAR (a ResNet-50) keeps its one size. The detector's person class is biased so it finds people.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpu_worker.engines import hmr2_assets
from gpu_worker.engines.hmr2_phalp import Settings, backbone_sized_by

SEED = 1234
VERTICES, FACES, JOINTS = 6890, 13776, 24
SMPL_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21]
HMR2_VIT = {"EMBED_DIM": 64, "DEPTH": 2, "NUM_HEADS": 4}
HMR2_HEAD = {"depth": 1, "heads": 2, "mlp_dim": 64, "dim_head": 32, "dropout": 0.0, "emb_dropout": 0.0,
             "norm": "layer", "context_dim": HMR2_VIT["EMBED_DIM"], "dim": 128}
# ViTDet as PHALP configures it, made small: 256-px input, a 2-block ViT, few proposals, at most
# 3 people a frame (a random detector proposes boxes everywhere)
DETECTOR_OVERRIDES = [
    "dataloader.test.mapper.augmentations.0.short_edge_length=256",
    "dataloader.test.mapper.augmentations.0.max_size=256",
    "model.backbone.square_pad=256",
    "model.backbone.net.img_size=256",
    "model.backbone.net.embed_dim=64",
    "model.backbone.net.depth=2",
    "model.backbone.net.num_heads=2",
    "model.backbone.net.window_block_indexes=[0]",
    "model.backbone.net.drop_path_rate=0.0",
    "model.proposal_generator.pre_nms_topk=[2000,60]",
    "model.proposal_generator.post_nms_topk=[1000,12]",
    *[f"model.roi_heads.box_predictors.{i}.test_topk_per_image=3" for i in range(3)],
]
# RegNetY-4GF Mask R-CNN (the 8 GB card's rung) at its real width and depth, reading 256-px images
# with few proposals
REGNETY_OVERRIDES = [
    "dataloader.test.mapper.augmentations.0.short_edge_length=256",
    "dataloader.test.mapper.augmentations.0.max_size=256",
    "model.proposal_generator.pre_nms_topk=[2000,60]",
    "model.proposal_generator.post_nms_topk=[1000,12]",
    "model.roi_heads.box_predictor.test_topk_per_image=3",
]
PERSON_BIAS = 8.0
CAMERA_WEIGHT_SCALE = 1e-3  # added to class 0's logit in every cascade stage's classifier


@dataclass
class SyntheticCache:
    home: Path
    torch_home: Path
    fvcore_cache: Path

    @property
    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "TORCH_HOME": str(self.torch_home), "FVCORE_CACHE": str(self.fvcore_cache)}

    def options(self, detector: str = "vitdet", **extra: Any) -> dict[str, Any]:
        """Engine options that point the engine at this cache and at the small detector."""
        overrides = DETECTOR_OVERRIDES if detector == "vitdet" else REGNETY_OVERRIDES
        return {"detector": detector, "appearance": "hmar", "warm_up": False,
                "cache_home": str(self.home), "torch_home": str(self.torch_home),
                "fvcore_cache": str(self.fvcore_cache), "detector_overrides": list(overrides), **extra}

    def paths(self, appearance: str = "hmar") -> dict[str, str]:
        return {a.name: a.path for a in hmr2_assets.required_assets("vitdet", self.env, appearance)}


def make_cache(root: Path) -> SyntheticCache:
    """Writes the whole cache under root (seconds). Imports hmr2/phalp/detectron2 with HOME=root/home,
    so call it in a process whose HOME may be changed (a pytest fixture's subprocess or a fresh one)."""
    import os

    cache = SyntheticCache(root / "home", root / "torch", root / "fvcore")
    os.environ.update(cache.env)  # PHALP and hmr2 read $HOME/.cache when imported
    paths = cache.paths(appearance="texture")
    rng = np.random.default_rng(SEED)
    import torch
    torch.manual_seed(SEED)
    smpl = smpl_model(rng)
    for key in ("hmr2_smpl_neutral", "phalp_smpl_neutral"):
        write_pickle(paths[key], smpl)
    j19 = nonnegative_rows(rng, 19, VERTICES, nonzero=8)
    for key in ("hmr2_smpl_to_j19", "phalp_smpl_to_j19"):
        write_pickle(paths[key], j19)
    for key in ("hmr2_smpl_mean_params", "phalp_smpl_mean_params"):
        write_mean_params(paths[key])
    write_phalp_files(paths, rng, smpl["f"])
    write_resnet50(paths["resnet50_imagenet"])
    write_hmar(paths["phalp_hmar_weights"])
    write_pose_predictor(paths["phalp_pose_predictor"], paths["phalp_pose_predictor_config"])
    write_hmr2(paths["hmr2_model_config"], paths["hmr2_checkpoint"])
    for detector in ("vitdet", "regnety"):
        write_detector(hmr2_assets.detector_weights_path(detector, cache.env), cache.options(detector))
    return cache


# --- the body model -------------------------------------------------------------------------------

def smpl_model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """SMPL's keys and shapes as smplx reads them (plain arrays: no chumpy), a blob of a body
    about 1.7 m tall so projections land in the image."""
    template = rng.normal(scale=[0.15, 0.5, 0.1], size=(VERTICES, 3))
    return {
        "v_template": template.astype(np.float64),
        "shapedirs": rng.normal(scale=0.01, size=(VERTICES, 3, 10)),
        "posedirs": rng.normal(scale=0.001, size=(VERTICES, 3, 207)),
        "J_regressor": nonnegative_rows(rng, JOINTS, VERTICES, nonzero=20),
        "weights": nonnegative_rows(rng, VERTICES, JOINTS, nonzero=4),
        "kintree_table": np.array([[p if p >= 0 else 4294967295 for p in SMPL_PARENTS], list(range(JOINTS))],
                                  dtype=np.int64),
        "f": rng.integers(0, VERTICES, size=(FACES, 3)).astype(np.uint32),
    }


def nonnegative_rows(rng: np.random.Generator, rows: int, cols: int, nonzero: int) -> np.ndarray:
    """Each row a convex combination of a few columns (a joint regressor, skinning weights)."""
    out = np.zeros((rows, cols))
    for row in range(rows):
        picked = rng.choice(cols, size=nonzero, replace=False)
        weights = rng.random(nonzero)
        out[row, picked] = weights / weights.sum()
    return out


def write_mean_params(path: str) -> None:
    identity_6d = np.tile([1.0, 0.0, 0.0, 1.0, 0.0, 0.0], 24)  # rot6d of the identity, per joint
    ensure_dir(path)
    with open(path, "wb") as fh:
        np.savez(fh, pose=identity_6d, shape=np.zeros(10), cam=np.array([0.9, 0.0, 0.0]))


# --- PHALP's own files ----------------------------------------------------------------------------

def write_phalp_files(paths: dict[str, str], rng: np.random.Generator, faces: np.ndarray) -> None:
    uv_count = 7576
    ensure_dir(paths["phalp_texture"])
    with open(paths["phalp_texture"], "wb") as fh:
        np.savez(fh, smpl_faces=faces.astype(np.int64), vt=rng.random((uv_count, 2)),
                 ft=rng.integers(0, uv_count, size=(FACES, 3)))
    ensure_dir(paths["phalp_mean_std"])
    np.save(paths["phalp_mean_std"], np.stack([np.zeros((1, 229)), np.ones((1, 229))]))
    face_map = rng.integers(-1, FACES, size=(256, 256))
    bary = rng.random((256, 256, 3))
    np.save(paths["phalp_uv_face_map"], face_map)
    np.save(paths["phalp_uv_bary_map"], bary / bary.sum(axis=2, keepdims=True))


def phalp_config(paths_home: str | None = None) -> Any:
    from omegaconf import OmegaConf
    from phalp.configs.base import FullConfig

    cfg = OmegaConf.structured(FullConfig)
    cfg.video.source = "synthetic"
    cfg.device = "cpu"
    return cfg


def write_resnet50(path: str) -> None:
    import torch
    from phalp.models.backbones.resnet import resnet50

    ensure_dir(path)
    torch.save(resnet50(pretrained=False).state_dict(), path)


def write_hmar(path: str) -> None:
    """hmar_v2_weights.pth's layout: {"model": {"hmar." + name}} with PHALP's smplx_head naming."""
    import torch
    from phalp.models.hmar.hmar import HMAR

    hmar = HMAR(phalp_config())
    kept = ("encoding_head", "texture_head", "backbone", "smpl_head")
    state = {"hmar." + k.replace("smpl_head", "smplx_head"): v for k, v in hmar.state_dict().items()
             if any(part in k for part in kept)}
    ensure_dir(path)
    torch.save({"model": state}, path)


POSE_PREDICTOR_CONFIG = {"configs": {
    "in_feat": 64, "frame_length": 64, "num_smpl_heads": 1, "mask_type_test": "zero", "mask_ratio": 0.0,
    "max_people": 1,
    "transformer": {"depth": 1, "heads": 2, "mlp_dim": 64, "dim_head": 32, "dropout": 0.0, "emb_dropout": 0.0,
                    "droppath": 0.0, "conv": {"pad": 1, "stride": 2}},
    "extra_feat": {"enable": "", "pose_shape": {"dim": 229, "mid_dim": 64, "en_dim": 64}},
    "ava": {"num_action_classes": 80, "num_valid_action_classes": 60, "predict_valid": True},
}}


def write_pose_predictor(weights_path: str, config_path: str) -> None:
    import torch
    from omegaconf import OmegaConf
    from phalp.models.predictor.pose_transformer_v2 import lart_transformer

    ensure_dir(config_path)
    OmegaConf.save(OmegaConf.create(POSE_PREDICTOR_CONFIG), config_path)
    opt = OmegaConf.load(config_path).configs
    t = opt.transformer
    encoder = lart_transformer(opt=opt, phalp_cfg=phalp_config(), dim=opt.in_feat, depth=t.depth, heads=t.heads,
                               mlp_dim=t.mlp_dim, dim_head=t.dim_head, dropout=t.dropout,
                               emb_dropout=t.emb_dropout, droppath=t.droppath)
    torch.save({"state_dict": {"encoder." + k: v for k, v in encoder.state_dict().items()}}, weights_path)


# --- HMR2 -----------------------------------------------------------------------------------------

def hmr2_model_config() -> dict[str, Any]:
    """The released model_config.yaml's keys (4D-Humans' hmr_vit_transformer experiment), with a
    small ViT and head; SMPL paths relative to the cache, as the release has them."""
    return {
        "SMPL": {"MODEL_PATH": "data/smpl", "GENDER": "neutral", "NUM_BODY_JOINTS": 23,
                 "JOINT_REGRESSOR_EXTRA": "data/SMPL_to_J19.pkl", "MEAN_PARAMS": "data/smpl_mean_params.npz"},
        "EXTRA": {"FOCAL_LENGTH": 5000, "NUM_LOG_IMAGES": 4, "NUM_LOG_SAMPLES_PER_IMAGE": 8, "PELVIS_IND": 39},
        "MODEL": {"IMAGE_SIZE": 256, "IMAGE_MEAN": [0.485, 0.456, 0.406], "IMAGE_STD": [0.229, 0.224, 0.225],
                  "BACKBONE": {"TYPE": "vit", **HMR2_VIT},
                  "SMPL_HEAD": {"TYPE": "transformer_decoder", "IN_CHANNELS": 2048,
                                "TRANSFORMER_DECODER": dict(HMR2_HEAD)}},
        "LOSS_WEIGHTS": {"KEYPOINTS_3D": 0.05, "KEYPOINTS_2D": 0.01, "GLOBAL_ORIENT": 0.001, "BODY_POSE": 0.001,
                         "BETAS": 0.0005, "ADVERSARIAL": 0.0},
        "TRAIN": {"LR": 1e-5, "WEIGHT_DECAY": 1e-4},
    }


def write_hmr2(config_path: str, checkpoint_path: str) -> None:
    import torch
    import yaml
    from hmr2.configs import get_config
    from hmr2.models import HMR2

    ensure_dir(config_path)
    with open(config_path, "w") as fh:
        yaml.safe_dump(hmr2_model_config(), fh)
    cfg = get_config(config_path, update_cachedir=True)
    with backbone_sized_by(cfg):
        model = HMR2(cfg, init_renderer=False)
    # a trained HMR2's weak-perspective scale is positive (PHALP takes its log): keep the random
    # camera near the mean camera of smpl_mean_params
    with torch.no_grad():
        model.smpl_head.deccam.weight.mul_(CAMERA_WEIGHT_SCALE)
        model.smpl_head.deccam.bias.zero_()
    ensure_dir(checkpoint_path)
    torch.save(lightning_checkpoint(model), checkpoint_path)


# The released checkpoint is a whole Lightning 1.x checkpoint. Which 1.x wrote it is recorded nowhere
# we can read (hmr2 imports pytorch_lightning.loggers.Logger, so 1.7 or later): a 1.8 file meets the
# migrations Lightning 2 applies to the files of 1.7 and later (1.9.0's callback state key, 2.0.0's loops).
RELEASE_LIGHTNING_VERSION = "1.8.6"
RELEASE_EPOCH, RELEASE_STEP = 35, 1_000_000
CHECKPOINT_EVERY_N_STEPS = 10_000  # GENERAL.CHECKPOINT_STEPS of the hmr_vit_transformer experiment
RELEASE_RUN_DIR = "logs/train/multiruns/hmr2/0"
# Lightning's progress trackers, by the counters each one keeps
READY_COMPLETED = ("ready", "completed")
STARTED = ("ready", "started", "completed")
PROCESSED = ("ready", "started", "processed", "completed")


def lightning_checkpoint(model: Any) -> dict[str, Any]:
    """What Lightning 1.8's dump_checkpoint writes for HMR2 trained by 4D-Humans' train.py: a
    ModelCheckpoint every CHECKPOINT_EVERY_N_STEPS (LearningRateMonitor and the progress bar keep no
    state), native AMP (precision 16), manual optimisation with HMR2's AdamW, no LR scheduler; the
    hyperparameters as save_hyperparameters(logger=False, ignore=['init_renderer']) keeps them (the
    yacs CfgNode `cfg`)."""
    return {
        "epoch": RELEASE_EPOCH,
        "global_step": RELEASE_STEP,
        "pytorch-lightning_version": RELEASE_LIGHTNING_VERSION,
        "state_dict": model.state_dict(),
        "loops": loops_state(),
        "callbacks": {model_checkpoint_state_key(): model_checkpoint_state()},
        "optimizer_states": optimizer_states(model),
        "lr_schedulers": [],
        "NativeMixedPrecisionPlugin": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                       "growth_interval": 2000, "_growth_tracker": 0},
        "hparams_name": model._hparams_name,
        "hyper_parameters": dict(model.hparams),
    }


def model_checkpoint_state_key() -> str:
    """Lightning 1.x keys a callback's state by its class name and the repr of its triggers (1.9
    dropped save_on_train_epoch_end from the key; the 1.9.0 migration drops it from old files)."""
    triggers = {"monitor": None, "mode": "min", "every_n_train_steps": CHECKPOINT_EVERY_N_STEPS,
                "every_n_epochs": 0, "train_time_interval": None, "save_on_train_epoch_end": False}
    return f"ModelCheckpoint{triggers!r}"


def model_checkpoint_state() -> dict[str, Any]:
    import torch

    dirpath = f"{RELEASE_RUN_DIR}/checkpoints"
    return {"monitor": None, "best_model_score": None,
            "best_model_path": f"{dirpath}/epoch={RELEASE_EPOCH}-step={RELEASE_STEP}.ckpt",
            "current_score": None, "dirpath": dirpath, "best_k_models": {}, "kth_best_model_path": "",
            "kth_value": torch.tensor(float("inf")), "last_model_path": f"{dirpath}/last.ckpt"}


def progress(done: int, counters: tuple[str, ...], current: int = 0) -> dict[str, Any]:
    return {"total": dict.fromkeys(counters, done), "current": dict.fromkeys(counters, current)}


def batch_progress(done: int, current: int = 0) -> dict[str, Any]:
    return {**progress(done, PROCESSED, current), "is_last_batch": False}


def loops_state() -> dict[str, Any]:
    """Lightning 1.8's four loops, as each loop's state_dict() flattens its children into one dict."""
    return {"fit_loop": fit_loop_state(), "validate_loop": evaluation_loop_state(),
            "test_loop": evaluation_loop_state(), "predict_loop": evaluation_loop_state()}


def evaluation_loop_state() -> dict[str, Any]:
    return {"state_dict": {}, "dataloader_progress": progress(0, READY_COMPLETED),
            "epoch_loop.state_dict": {}, "epoch_loop.batch_progress": batch_progress(0)}


def fit_loop_state() -> dict[str, Any]:
    validations = RELEASE_STEP // 1000  # counters no reader uses: plausible, not the release's
    return {
        "state_dict": {},
        "epoch_progress": progress(RELEASE_EPOCH, PROCESSED, current=RELEASE_EPOCH),
        "epoch_loop.state_dict": {"_batches_that_stepped": RELEASE_STEP},
        "epoch_loop.batch_progress": batch_progress(RELEASE_STEP),
        "epoch_loop.scheduler_progress": progress(0, READY_COMPLETED),
        "epoch_loop.batch_loop.state_dict": {},
        "epoch_loop.batch_loop.optimizer_loop.state_dict": {},
        "epoch_loop.batch_loop.optimizer_loop.optim_progress": {
            "optimizer": {"step": progress(0, READY_COMPLETED), "zero_grad": progress(0, STARTED)},
            "optimizer_position": 0},
        "epoch_loop.batch_loop.manual_loop.state_dict": {},
        "epoch_loop.batch_loop.manual_loop.optim_step_progress": progress(RELEASE_STEP, READY_COMPLETED),
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.dataloader_progress": progress(validations, READY_COMPLETED),
        "epoch_loop.val_loop.epoch_loop.state_dict": {},
        "epoch_loop.val_loop.epoch_loop.batch_progress": batch_progress(validations),
    }


def optimizer_states(model: Any) -> list[dict[str, Any]]:
    """HMR2.configure_optimizers' AdamW (and the discriminator's, when the config trains one), as
    state_dict() writes them, without the per-parameter moments: the released file (about 2.5 GB, the
    ViT-H weights alone in float32) has no room for AdamW's two moments per weight, and no reader
    looks at them."""
    import torch

    lr, decay = model.cfg.TRAIN.LR, model.cfg.TRAIN.WEIGHT_DECAY
    trained = [p for p in model.get_parameters() if p.requires_grad]
    optimizers = [torch.optim.AdamW([{"params": trained, "lr": lr}], weight_decay=decay)]
    if hasattr(model, "discriminator"):
        optimizers.append(torch.optim.AdamW(model.discriminator.parameters(), lr=lr, weight_decay=decay))
    return [optimizer.state_dict() for optimizer in optimizers]


# --- the detector ---------------------------------------------------------------------------------

def write_detector(path: str, options: dict[str, Any]) -> None:
    """The detector's random weights as a detectron2 model-zoo pickle, person class biased."""
    from detectron2.config import instantiate

    from gpu_worker.engines.hmr2_phalp import detector_config

    model = instantiate(detector_config(Settings.from_options(options)).model)
    state = model.state_dict()
    for name, value in state.items():
        if name.endswith("cls_score.bias"):
            value[0] += PERSON_BIAS
    ensure_dir(path)
    write_pickle(path, {"model": {k: v.numpy() for k, v in state.items()},
                        "__author__": "pose-service synthetic test fixture (random weights)"})


def write_pickle(path: str, value: Any) -> None:
    ensure_dir(path)
    with open(path, "wb") as fh:
        pickle.dump(value, fh, protocol=pickle.HIGHEST_PROTOCOL)


def ensure_dir(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    import sys
    import time

    started = time.monotonic()
    made = make_cache(Path(sys.argv[1]))
    rows = hmr2_assets.check("vitdet", made.env, "texture")
    for row in rows:
        print(f"{row['status']:<9} {row['size']:>11} {row['name']} {row['problem']}")
    print(f"{time.monotonic() - started:.1f}s")

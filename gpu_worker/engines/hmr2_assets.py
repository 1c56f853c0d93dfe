"""Every file the hmr2_phalp engine reads, in the caches 4D-Humans, PHALP, torchvision and detectron2
really use, so a missing or truncated download is found before 6 GB of models start loading.

Neither project checks sizes or hashes (a half-written file counts as cached), and their download
hosts have moved, so the engine never downloads: it verifies, and names where each file comes from.
Minimum sizes are lower bounds meant to catch truncation, not exact sizes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

HMR2_ARCHIVE = ("hmr2_data.tar.gz from https://www.cs.utexas.edu/~pavlakos/4dhumans/hmr2_data.tar.gz "
                "(formerly people.eecs.berkeley.edu/~jathushan/projects/4dhumans/; a Hugging Face copy "
                "is camenduru/4D-Humans), extracted into {dir}")
PHALP_HOST = "https://www.cs.utexas.edu/~pavlakos/phalp/"
SMPL_LICENCE = ("SMPL neutral model (licence: register at https://smplify.is.tue.mpg.de, download "
                "basicModel_neutral_lbs_10_207_0_v1.0.0.pkl, convert it to a Python 3 pickle and "
                "save it as {path}; non-commercial use only)")
VITDET_URL = ("https://dl.fbaipublicfiles.com/detectron2/ViTDet/COCO/cascade_mask_rcnn_vitdet_h/"
              "f328730692/model_final_f05665.pkl")
REGNETY_URL = ("https://dl.fbaipublicfiles.com/detectron2/new_baselines/"
               "mask_rcnn_regnety_4gf_dds_FPN_400ep_LSJ/42045954/model_final_ef3a80.pkl")
RESNET50_URL = "https://download.pytorch.org/models/resnet50-19c8e357.pth"

DETECTOR_ALIASES = {"vitdet": "vitdet", "regnety": "regnety", "maskrcnn": "regnety"}

MB = 1_000_000


@dataclass(frozen=True)
class Asset:
    name: str
    path: str
    min_size: int
    source: str
    used_by: str


def normalize_detector(detector: str) -> str:
    """PHALP calls the RegNetY-4GF Mask R-CNN "maskrcnn"; 4D-Humans' demo calls it "regnety"."""
    try:
        return DETECTOR_ALIASES[str(detector).lower()]
    except KeyError:
        raise ValueError(f"unknown detector {detector!r}; one of vitdet, regnety, maskrcnn") from None


def home_cache(env: Mapping[str, str]) -> str:
    """Both projects use $HOME/.cache (not XDG_CACHE_HOME), frozen when they are imported."""
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".cache")


def torch_hub_checkpoints(env: Mapping[str, str]) -> str:
    """torch.hub's rule: $TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch."""
    torch_home = env.get("TORCH_HOME")
    if not torch_home:
        xdg = env.get("XDG_CACHE_HOME") or home_cache(env)
        torch_home = os.path.join(xdg, "torch")
    return os.path.join(os.path.expanduser(torch_home), "hub", "checkpoints")


def iopath_cache(env: Mapping[str, str]) -> str:
    """detectron2 caches URLs through iopath: $FVCORE_CACHE, else ~/.torch/iopath_cache."""
    explicit = env.get("FVCORE_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".torch", "iopath_cache")


def iopath_local_path(url: str, env: Mapping[str, str]) -> str:
    """Where iopath's HTTPURLHandler stores `url`: the cache dir plus the URL's path."""
    path_part = url.split("://", 1)[1].split("/", 1)[1]
    return os.path.join(iopath_cache(env), *path_part.split("/"))


def detector_weights_path(detector: str, env: Mapping[str, str] = os.environ) -> str:
    url = VITDET_URL if normalize_detector(detector) == "vitdet" else REGNETY_URL
    return iopath_local_path(url, env)


def hmr2_assets(env: Mapping[str, str]) -> list[Asset]:
    root = os.path.join(home_cache(env), "4DHumans")
    run_dir = os.path.join(root, "logs", "train", "multiruns", "hmr2", "0")
    archive = HMR2_ARCHIVE.format(dir=root)
    smpl = os.path.join(root, "data", "smpl", "SMPL_NEUTRAL.pkl")
    return [
        Asset("hmr2_checkpoint", os.path.join(run_dir, "checkpoints", "epoch=35-step=1000000.ckpt"),
              2_000 * MB, archive, "HMR2 (ViT-H), about 2.5 GB"),
        Asset("hmr2_model_config", os.path.join(run_dir, "model_config.yaml"), 200, archive, "HMR2"),
        Asset("hmr2_smpl_neutral", smpl, 20 * MB, SMPL_LICENCE.format(path=smpl), "HMR2 SMPL layer"),
        Asset("hmr2_smpl_to_j19", os.path.join(root, "data", "SMPL_to_J19.pkl"), 500_000, archive,
              "HMR2 extra joints"),
        Asset("hmr2_smpl_mean_params", os.path.join(root, "data", "smpl_mean_params.npz"), 1_000, archive,
              "HMR2 head"),
    ]


def phalp_assets(env: Mapping[str, str]) -> list[Asset]:
    root = os.path.join(home_cache(env), "phalp")

    def hosted(name: str, rel: str, min_size: int, used_by: str, remote: str | None = None) -> Asset:
        path = os.path.join(root, rel)
        return Asset(name, path, min_size, f"{PHALP_HOST}{remote or rel} -> {path}", used_by)

    smpl = os.path.join(root, "3D", "models", "smpl", "SMPL_NEUTRAL.pkl")
    return [
        Asset("phalp_smpl_neutral", smpl, 20 * MB, SMPL_LICENCE.format(path=smpl), "PHALP SMPL layer"),
        hosted("phalp_smpl_to_j19", "3D/SMPL_to_J19.pkl", 500_000, "PHALP 45-joint output"),
        hosted("phalp_smpl_mean_params", "3D/smpl_mean_params.npz", 1_000, "PHALP HMAR head"),
        hosted("phalp_texture", "3D/texture.npz", 100_000, "PHALP HMAR uv sampler"),
        hosted("phalp_mean_std", "3D/mean_std.npy", 200, "PHALP pose predictor"),
        hosted("phalp_uv_bary_map", "3D/bmap_256.npy", 700_000, "appearance texture sampler",
               remote="bmap_256.npy"),
        hosted("phalp_uv_face_map", "3D/fmap_256.npy", 250_000, "appearance texture sampler",
               remote="fmap_256.npy"),
        hosted("phalp_hmar_weights", "weights/hmar_v2_weights.pth", 100 * MB,
               "PHALP appearance encoder, about 166 MB", remote="weights/hmar_v2_weights.pth"),
        hosted("phalp_pose_predictor", "weights/pose_predictor.pth", 50 * MB,
               "PHALP pose transformer, about 140 MB", remote="weights/pose_predictor_40006.ckpt"),
        hosted("phalp_pose_predictor_config", "weights/pose_predictor.yaml", 100,
               "PHALP pose transformer", remote="weights/config_40006.yaml"),
    ]


def torchvision_assets(env: Mapping[str, str]) -> list[Asset]:
    path = os.path.join(torch_hub_checkpoints(env), "resnet50-19c8e357.pth")
    return [Asset("resnet50_imagenet", path, 100 * MB, f"{RESNET50_URL} -> {path}",
                  "PHALP HMAR backbone (built with pretrained=True, so torchvision downloads it)")]


def detector_assets(detector: str, env: Mapping[str, str]) -> list[Asset]:
    chosen = normalize_detector(detector)
    path = detector_weights_path(chosen, env)
    if chosen == "vitdet":
        return [Asset("vitdet_h_weights", path, 2_000 * MB, f"{VITDET_URL} -> {path}",
                      "ViTDet-H cascade Mask R-CNN, about 2.7 GB")]
    return [Asset("regnety_weights", path, 150 * MB, f"{REGNETY_URL} -> {path}",
                  "RegNetY-4GF Mask R-CNN, about 168 MB")]


def required_assets(detector: str = "vitdet", env: Mapping[str, str] = os.environ) -> list[Asset]:
    """Everything the engine's load stages read. PHALP's unused Mask R-CNN X101, head_faces.npy
    (rendering) and AVA label files are left out on purpose: this engine never builds or reads them."""
    return (hmr2_assets(env) + phalp_assets(env) + torchvision_assets(env)
            + detector_assets(detector, env))


def probe_assets(detector: str = "vitdet", env: Mapping[str, str] = os.environ) -> list[Asset]:
    """What the detector probe alone needs."""
    return detector_assets(detector, env)


def asset_status(asset: Asset) -> tuple[str, int]:
    try:
        size = os.path.getsize(asset.path)
    except OSError:
        return "missing", 0
    if not os.path.isfile(asset.path):
        return "missing", 0
    return ("present" if size >= asset.min_size else "truncated"), size


def verify(assets: list[Asset]) -> list[dict]:
    rows = []
    for asset in assets:
        status, size = asset_status(asset)
        rows.append({"name": asset.name, "path": asset.path, "status": status, "size": size,
                     "min_size": asset.min_size, "source": asset.source})
    return rows


def problems(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["status"] != "present"]


def describe_problems(rows: list[dict]) -> str:
    lines = []
    for row in problems(rows):
        if row["status"] == "missing":
            lines.append(f"{row['name']}: missing {row['path']}; get it from {row['source']}")
        else:
            lines.append(f"{row['name']}: truncated {row['path']} ({row['size']} bytes, expected at "
                         f"least {row['min_size']}); download it again from {row['source']}")
    return "\n".join(lines)

"""Every file the hmr2_phalp engine reads, in the caches 4D-Humans, PHALP, torchvision and detectron2
really use, so a missing or truncated download is found before 6 GB of models start loading.

Neither project checks sizes or hashes (a half-written file counts as cached), and their download
hosts have moved, so the engine never downloads: it verifies, and names where each file comes from.
Minimum sizes are lower bounds meant to catch truncation; each file's content is then read the
way its user reads it (pickle, npz, yaml, torch checkpoint) and its keys and shapes are checked,
so a wrong file under the right name (an npz renamed .pkl, a checkpoint of another model) is
found here and not as a shape error minutes into loading. `pose-service models verify` and the
engine's weights stage call the same `check`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

HMR2_ARCHIVE_URL = "https://www.cs.utexas.edu/~pavlakos/4dhumans/hmr2_data.tar.gz"
HMR2_ARCHIVE = (f"hmr2_data.tar.gz from {HMR2_ARCHIVE_URL} "
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

DETECTOR_ALIASES = {"vitdet": "vitdet", "regnety": "regnety", "maskrcnn": "regnety", "mediapipe": "mediapipe"}
# detectors whose weights are a detectron2 checkpoint; mediapipe's ship inside its wheel

MB = 1_000_000


@dataclass(frozen=True)
class Asset:
    name: str
    path: str
    min_size: int
    source: str
    used_by: str
    content: str = ""  # the key of CONTENT_CHECKS that reads this file; "" = size only


def normalize_detector(detector: str) -> str:
    """PHALP calls the RegNetY-4GF Mask R-CNN "maskrcnn"; 4D-Humans' demo calls it "regnety"."""
    try:
        return DETECTOR_ALIASES[str(detector).lower()]
    except KeyError:
        raise ValueError(f"unknown detector {detector!r}; one of vitdet, regnety, maskrcnn, mediapipe") from None


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
              2_000 * MB, archive, "HMR2 (ViT-H), about 2.5 GB", "hmr2_checkpoint"),
        Asset("hmr2_model_config", os.path.join(run_dir, "model_config.yaml"), 200, archive, "HMR2",
              "hmr2_config"),
        Asset("hmr2_smpl_neutral", smpl, 20 * MB, SMPL_LICENCE.format(path=smpl), "HMR2 SMPL layer", "smpl"),
        Asset("hmr2_smpl_to_j19", os.path.join(root, "data", "SMPL_to_J19.pkl"), 500_000, archive,
              "HMR2 extra joints", "j19"),
        Asset("hmr2_smpl_mean_params", os.path.join(root, "data", "smpl_mean_params.npz"), 1_000, archive,
              "HMR2 head", "mean_params"),
    ]


def phalp_assets(env: Mapping[str, str], appearance: str = "texture") -> list[Asset]:
    root = os.path.join(home_cache(env), "phalp")

    def hosted(name: str, rel: str, min_size: int, used_by: str, content: str, remote: str | None = None) -> Asset:
        path = os.path.join(root, rel)
        return Asset(name, path, min_size, f"{PHALP_HOST}{remote or rel} -> {path}", used_by, content)

    smpl = os.path.join(root, "3D", "models", "smpl", "SMPL_NEUTRAL.pkl")
    assets = [
        Asset("phalp_smpl_neutral", smpl, 20 * MB, SMPL_LICENCE.format(path=smpl), "PHALP SMPL layer", "smpl"),
        hosted("phalp_smpl_to_j19", "3D/SMPL_to_J19.pkl", 500_000, "PHALP 45-joint output", "j19"),
        hosted("phalp_smpl_mean_params", "3D/smpl_mean_params.npz", 1_000, "PHALP HMAR head", "mean_params"),
        hosted("phalp_texture", "3D/texture.npz", 100_000, "PHALP HMAR uv sampler", "texture"),
        hosted("phalp_mean_std", "3D/mean_std.npy", 200, "PHALP pose predictor", "mean_std"),
        hosted("phalp_hmar_weights", "weights/hmar_v2_weights.pth", 100 * MB,
               "PHALP appearance encoder, about 166 MB", "hmar_weights", remote="weights/hmar_v2_weights.pth"),
        hosted("phalp_pose_predictor", "weights/pose_predictor.pth", 50 * MB,
               "PHALP pose transformer, about 140 MB", "pose_predictor", remote="weights/pose_predictor_40006.ckpt"),
        hosted("phalp_pose_predictor_config", "weights/pose_predictor.yaml", 100,
               "PHALP pose transformer", "pose_predictor_config", remote="weights/config_40006.yaml"),
    ]
    if appearance != "hmar":  # the texture sampler's uv atlas (track.py's HMR2023TextureSampler)
        assets += [
            hosted("phalp_uv_bary_map", "3D/bmap_256.npy", 700_000, "appearance texture sampler", "uv_bary",
                   remote="bmap_256.npy"),
            hosted("phalp_uv_face_map", "3D/fmap_256.npy", 250_000, "appearance texture sampler", "uv_face",
                   remote="fmap_256.npy"),
        ]
    return assets


def torchvision_assets(env: Mapping[str, str]) -> list[Asset]:
    path = os.path.join(torch_hub_checkpoints(env), "resnet50-19c8e357.pth")
    return [Asset("resnet50_imagenet", path, 100 * MB, f"{RESNET50_URL} -> {path}",
                  "PHALP HMAR backbone (built with pretrained=True, so torchvision downloads it)", "resnet50")]


def detector_assets(detector: str, env: Mapping[str, str]) -> list[Asset]:
    chosen = normalize_detector(detector)
    if chosen == "mediapipe":
        return []  # its models are inside the mediapipe wheel
    path = detector_weights_path(chosen, env)
    if chosen == "vitdet":
        return [Asset("vitdet_h_weights", path, 2_000 * MB, f"{VITDET_URL} -> {path}",
                      "ViTDet-H cascade Mask R-CNN, about 2.7 GB", "detectron2")]
    return [Asset("regnety_weights", path, 150 * MB, f"{REGNETY_URL} -> {path}",
                  "RegNetY-4GF Mask R-CNN, about 168 MB", "detectron2")]


def required_assets(detector: str = "vitdet", env: Mapping[str, str] = os.environ,
                    appearance: str = "texture") -> list[Asset]:
    """Everything the engine's load stages read. PHALP's unused Mask R-CNN X101, head_faces.npy
    (rendering) and AVA label files are left out on purpose: this engine never builds or reads them."""
    return (hmr2_assets(env) + phalp_assets(env, appearance) + torchvision_assets(env)
            + detector_assets(detector, env))


def probe_assets(detector: str = "vitdet", env: Mapping[str, str] = os.environ) -> list[Asset]:
    """What the detector probe alone needs."""
    return detector_assets(detector, env)


def check(detector: str, env: Mapping[str, str], appearance: str = "texture",
          probe_only: bool = False) -> list[dict]:
    """The one check of the cache, for `models verify` and the engine's weights stage alike."""
    assets = probe_assets(detector, env) if probe_only else required_assets(detector, env, appearance)
    return verify(assets)


def asset_status(asset: Asset) -> tuple[str, int, str]:
    """present, missing, truncated (unreadable and shorter than the real file), invalid (the wrong
    content) or unreadable_here (it names a class this environment cannot import: the file may be
    intact, a package is missing). The size alone decides nothing: a readable file of the right keys
    and shapes passes whatever its size (the test tier's small random checkpoints do)."""
    try:
        size = os.path.getsize(asset.path)
    except OSError:
        return "missing", 0, ""
    if not os.path.isfile(asset.path):
        return "missing", 0, ""
    try:
        problem = content_problem(asset) if asset.content else ("" if size >= asset.min_size else "too small")
    except UnimportableClass as exc:
        return "unreadable_here", size, str(exc)
    if not problem:
        return "present", size, ""
    return ("truncated" if size < asset.min_size else "invalid"), size, problem


def verify(assets: list[Asset]) -> list[dict]:
    rows = []
    for asset in assets:
        status, size, problem = asset_status(asset)
        rows.append({"name": asset.name, "path": asset.path, "status": status, "size": size,
                     "min_size": asset.min_size, "source": asset.source, "problem": problem})
    return rows


def problems(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["status"] != "present"]


def describe_problems(rows: list[dict]) -> str:
    lines = []
    for row in problems(rows):
        if row["status"] == "missing":
            lines.append(f"{row['name']}: missing {row['path']}; get it from {row['source']}")
        elif row["status"] == "unreadable_here":
            lines.append(f"{row['name']}: {row['path']} cannot be read in this environment: {row['problem']}")
        elif row["status"] == "truncated":
            lines.append(f"{row['name']}: truncated {row['path']} ({row['size']} bytes, expected at "
                         f"least {row['min_size']}); download it again from {row['source']}")
        else:
            lines.append(f"{row['name']}: not the expected file {row['path']}: {row['problem']}; "
                         f"get it from {row['source']}")
        if row["status"] == "truncated" and row.get("problem"):
            lines[-1] += f" ({row['problem']})"
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# content: each file read the way its user reads it, then its keys and shapes checked


SMPL_VERTICES, SMPL_FACES, SMPL_JOINTS = 6890, 13776, 24
SMPL_SHAPES = {"v_template": (SMPL_VERTICES, 3), "posedirs": (SMPL_VERTICES, 3, 207),
               "J_regressor": (SMPL_JOINTS, SMPL_VERTICES), "weights": (SMPL_VERTICES, SMPL_JOINTS),
               "kintree_table": (2, SMPL_JOINTS), "f": (SMPL_FACES, 3)}


class ContentError(ValueError):
    pass


def content_problem(asset: Asset) -> str:
    if not asset.content:
        return ""
    try:
        CONTENT_CHECKS[asset.content](asset.path)
    except UnimportableClass:
        raise  # not a problem of the file's: asset_status says so
    except ContentError as exc:
        return str(exc)
    except Exception as exc:  # unreadable as the format its user expects
        return f"cannot be read as {FORMATS[asset.content]} ({type(exc).__name__}: {str(exc)[:200]})"
    return ""


def shape_of(value) -> tuple:
    return tuple(getattr(value, "shape", None) or ())


def expect_shape(what: str, value, shape: tuple) -> None:
    if shape_of(value) != tuple(shape):
        raise ContentError(f"{what} has shape {shape_of(value)}, expected {tuple(shape)}")


HMR2_KEYS = ["backbone.patch_embed.proj.weight", "backbone.pos_embed", "backbone.last_norm.weight",
             "smpl_head.decpose.weight", "smpl_head.decshape.weight", "smpl_head.deccam.weight"]
POSE_PREDICTOR_PREFIXES = ["transformer.", "transformer1.", "smpl_head.0.", "loca_head.0."]


def expect_prefixes(what: str, mapping, prefixes) -> None:
    """At least one key under each prefix (a submodule the loader fills)."""
    missing = [p for p in prefixes if not any(str(k).startswith(p) for k in mapping)]
    if missing:
        raise ContentError(f"{what} has no weights for {', '.join(p.rstrip('.') for p in missing)}")


def expect_keys(what: str, mapping, keys) -> None:
    if not hasattr(mapping, "keys"):
        raise ContentError(f"{what} is a {type(mapping).__name__}, expected a mapping")
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ContentError(f"{what} lacks {', '.join(missing)}")


def read_pickle(path: str):
    import pickle
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")


IMPORT_SMPL_STEP = ("it holds chumpy objects and chumpy does not import here (numpy >= 1.24 / Python >= 3.11): "
                    "run `pose-service models import-smpl {path}` to write it as plain numpy (no chumpy needed)")


def pickle_modules(path: str) -> set[str]:
    """The top-level modules a pickle's classes come from, read from its opcodes (nothing is built)."""
    import pickletools

    found: set[str] = set()
    with open(path, "rb") as fh:
        for opcode, arg, _ in pickletools.genops(fh):
            if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                found.add(arg.split(" ")[0].split(".")[0])
            elif opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE") and isinstance(arg, str) \
                    and arg.split(".")[0] == "chumpy":
                found.add("chumpy")  # protocol 4 names a class's module in a string before STACK_GLOBAL
    return found


def importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def check_smpl(path: str) -> None:
    """smplx's reading: a pickled dict of arrays (chumpy arrays need chumpy importable, as for smplx;
    without it `models import-smpl` converts the file)."""
    if "chumpy" in pickle_modules(path) and not importable("chumpy"):
        raise ContentError(IMPORT_SMPL_STEP.format(path=path))
    data = read_pickle(path)
    expect_keys("the SMPL model", data, [*SMPL_SHAPES, "shapedirs"])
    for key, shape in SMPL_SHAPES.items():
        expect_shape(f"SMPL {key}", data[key], shape)
    dirs = shape_of(data["shapedirs"])
    if dirs[:2] != (SMPL_VERTICES, 3) or len(dirs) != 3 or dirs[2] < 10:
        raise ContentError(f"SMPL shapedirs has shape {dirs}, expected ({SMPL_VERTICES}, 3, >=10)")
    gender = str(data.get("gender", "neutral")).lower()
    if gender not in ("neutral", "n"):
        raise ContentError(f"the SMPL model is {gender!r}, the engine needs the neutral one")


def check_j19(path: str) -> None:
    expect_shape("SMPL_to_J19", read_pickle(path), (19, SMPL_VERTICES))


def check_mean_params(path: str) -> None:
    import numpy as np
    with np.load(path) as data:
        expect_keys("smpl_mean_params", data, ["pose", "shape", "cam"])
        for key, size in (("pose", 144), ("shape", 10), ("cam", 3)):
            if data[key].size != size:
                raise ContentError(f"smpl_mean_params {key} has {data[key].size} values, expected {size}")


def check_texture(path: str) -> None:
    import numpy as np
    with np.load(path) as data:
        expect_keys("texture.npz", data, ["smpl_faces", "vt", "ft"])
        expect_shape("texture smpl_faces", data["smpl_faces"], (SMPL_FACES, 3))
        expect_shape("texture ft", data["ft"], (SMPL_FACES, 3))
        if data["vt"].ndim != 2 or data["vt"].shape[1] != 2:
            raise ContentError(f"texture vt has shape {data['vt'].shape}, expected (N, 2)")


def check_mean_std(path: str) -> None:
    import numpy as np
    value = np.load(path, allow_pickle=True)
    if value.ndim != 3 or value.shape[:2] != (2, 1) or value.shape[2] > 229:
        raise ContentError(f"mean_std has shape {value.shape}, expected (2, 1, <=229)")


def check_uv_bary(path: str) -> None:
    import numpy as np
    expect_shape("bmap_256", np.load(path), (256, 256, 3))


def check_uv_face(path: str) -> None:
    import numpy as np
    expect_shape("fmap_256", np.load(path), (256, 256))


def read_yaml(path: str):
    from omegaconf import OmegaConf
    return OmegaConf.load(path)


def check_hmr2_config(path: str) -> None:
    cfg = read_yaml(path)
    for key in ("MODEL.BACKBONE.TYPE", "MODEL.SMPL_HEAD.TYPE", "SMPL.MODEL_PATH", "SMPL.MEAN_PARAMS",
                "EXTRA.FOCAL_LENGTH"):
        if select(cfg, key) is None:
            raise ContentError(f"model_config.yaml has no {key}")
    if select(cfg, "MODEL.BACKBONE.TYPE") != "vit":
        raise ContentError(f"model_config.yaml names backbone {select(cfg, 'MODEL.BACKBONE.TYPE')!r}, expected vit")


def select(cfg, dotted: str):
    from omegaconf import OmegaConf
    return OmegaConf.select(cfg, dotted, default=None)


class UnimportableClass(ContentError):
    """The file refers to a class that this Python environment cannot import: the file itself may be
    intact, what is missing is the package (or the version of it) that defines the class."""


def torch_load(path: str, like_lightning: bool = False):
    """Tensors mapped, not read: a 2.5 GB checkpoint is checked in a moment. `like_lightning`: read
    as LightningModule.load_from_checkpoint reads it, under Lightning's patch for old checkpoints
    (classes it removed or moved since). Tried without it first: the patch only adds names, so a
    file that loads without it loads the same with it, and importing Lightning takes seconds."""
    try:
        return torch_load_naming_classes(path)
    except UnimportableClass:
        if not like_lightning or (legacy_patch := lightning_legacy_patch()) is None:
            raise
        with legacy_patch:
            return torch_load_naming_classes(path)


def torch_load_naming_classes(path: str):
    import torch

    pickle_module = naming_pickle_module()
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True, pickle_module=pickle_module)
    except RuntimeError:  # the legacy (non-zip) format cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_module)


def naming_pickle_module() -> Any:
    """pickle, with an Unpickler that names the class it could not find (pickle's own error names the
    module alone, or the class with the module's file path). Made at each call, on the pickle.Unpickler
    of the moment: Lightning's legacy patch replaces that class while it is active."""
    import pickle
    import types

    class NamingUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError) as exc:
                raise UnimportableClass(unimportable_class_problem(module, name, exc)) from exc

    return types.SimpleNamespace(__name__="pickle", Unpickler=NamingUnpickler,
                                 load=lambda fh, **kwargs: NamingUnpickler(fh, **kwargs).load())


def unimportable_class_problem(module: str, name: str, exc: BaseException) -> str:
    reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, ImportError) else f"{module} has no {name}"
    return (f"it refers to the class {module}.{name}, which this Python environment cannot import ({reason}); "
            "the file may well be intact: install the package that defines that class, or the version of "
            "it that wrote the file")


def lightning_legacy_patch() -> Any:
    """pytorch_lightning's context for unpickling old checkpoints, or None without pytorch_lightning."""
    try:
        from pytorch_lightning.utilities.migration import pl_legacy_patch
    except ImportError:
        return None
    return pl_legacy_patch()


def check_hmr2_checkpoint(path: str) -> None:
    # HMR2.load_from_checkpoint unpickles the whole Lightning checkpoint (hyper_parameters' yacs
    # CfgNode, callbacks, loops...), not only its state_dict: so does this
    state = torch_load(path, like_lightning=True)
    expect_keys("the HMR2 checkpoint", state, ["state_dict"])
    weights = state["state_dict"]
    # HMR2.load_from_checkpoint is strict=False: a missing key would stay at random init silently, so
    # every part the forward pass uses is looked for (backbone ends, the head's decoder and outputs)
    expect_keys("the HMR2 state_dict", weights, HMR2_KEYS)
    expect_prefixes("the HMR2 state_dict", weights, ["backbone.blocks.0.", "smpl_head.transformer."])
    expect_shape("smpl_head.decshape.weight", weights["smpl_head.decshape.weight"],
                 (10, shape_of(weights["smpl_head.decshape.weight"])[1]))
    patch = shape_of(weights["backbone.patch_embed.proj.weight"])
    if len(patch) != 4 or patch[1:] != (3, 16, 16):
        raise ContentError(f"backbone.patch_embed.proj.weight has shape {patch}, expected (D, 3, 16, 16)")


def check_resnet50(path: str) -> None:
    weights = torch_load(path)
    expect_keys("the ResNet-50 weights", weights, ["conv1.weight", "layer4.2.conv3.weight"])
    expect_shape("conv1.weight", weights["conv1.weight"], (64, 3, 7, 7))
    expect_shape("layer4.2.conv3.weight", weights["layer4.2.conv3.weight"], (2048, 512, 1, 1))


def check_hmar_weights(path: str) -> None:
    state = torch_load(path)
    expect_keys("the HMAR checkpoint", state, ["model"])
    names = list(state["model"])
    for part in ("encoding_head", "texture_head", "backbone"):
        if not any(part in name for name in names):
            raise ContentError(f"the HMAR checkpoint has no {part} weights")


def check_pose_predictor_config(path: str) -> None:
    cfg = read_yaml(path)
    for key in ("configs.in_feat", "configs.frame_length", "configs.transformer.depth",
                "configs.extra_feat.pose_shape.dim", "configs.num_smpl_heads"):
        if select(cfg, key) is None:
            raise ContentError(f"pose_predictor.yaml has no {key}")


def check_pose_predictor(path: str) -> None:
    state = torch_load(path)
    expect_keys("the pose predictor checkpoint", state, ["state_dict"])
    # PHALP's Pose_transformer_v2.load_weights loads `k.replace("encoder.", "")` with strict=False: the
    # keys checked are those names after that renaming (pose_shape_encoder.* never survives it and stays
    # at its initialisation upstream, so it is not required here)
    loaded = {key.replace("encoder.", ""): value for key, value in state["state_dict"].items()}
    expect_prefixes("the pose predictor state_dict, as PHALP renames it,", loaded, POSE_PREDICTOR_PREFIXES)


class _ArrayShape:
    """Stands for a pickled numpy array: keeps its shape, drops its bytes."""

    def __init__(self, *args: Any) -> None:
        self.shape: tuple = ()

    def __setstate__(self, state) -> None:
        self.shape = tuple(state[1])


def check_detectron2(path: str) -> None:
    """detectron2's model-zoo pickle ({"model": {name: ndarray}}), read without keeping the arrays."""
    import pickle

    class ShapesOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if name in ("_reconstruct", "ndarray") and module.startswith("numpy"):
                return _ArrayShape
            return super().find_class(module, name)

    with open(path, "rb") as fh:
        data = ShapesOnly(fh, encoding="latin1").load()
    expect_keys("the detector checkpoint", data, ["model"])
    names = list(data["model"])
    if not any(name.startswith("backbone.") for name in names):
        raise ContentError("the detector checkpoint has no backbone weights")
    classifiers = [name for name in names if name.endswith("cls_score.weight")]
    if not classifiers:
        raise ContentError("the detector checkpoint has no box classifier (cls_score)")
    rows = shape_of(data["model"][classifiers[0]])[:1]
    if rows != (81,):
        raise ContentError(f"{classifiers[0]} scores {rows and rows[0]} classes, expected 81 (COCO + background)")


CONTENT_CHECKS = {
    "smpl": check_smpl, "j19": check_j19, "mean_params": check_mean_params, "texture": check_texture,
    "mean_std": check_mean_std, "uv_bary": check_uv_bary, "uv_face": check_uv_face,
    "hmr2_config": check_hmr2_config, "hmr2_checkpoint": check_hmr2_checkpoint, "resnet50": check_resnet50,
    "hmar_weights": check_hmar_weights, "pose_predictor": check_pose_predictor,
    "pose_predictor_config": check_pose_predictor_config, "detectron2": check_detectron2,
}
FORMATS = {"smpl": "a pickle", "j19": "a pickle", "mean_params": "an npz archive", "texture": "an npz archive",
           "mean_std": "a numpy array", "uv_bary": "a numpy array", "uv_face": "a numpy array",
           "hmr2_config": "YAML", "pose_predictor_config": "YAML", "hmr2_checkpoint": "a torch checkpoint",
           "resnet50": "a torch checkpoint", "hmar_weights": "a torch checkpoint",
           "pose_predictor": "a torch checkpoint", "detectron2": "a detectron2 pickle"}

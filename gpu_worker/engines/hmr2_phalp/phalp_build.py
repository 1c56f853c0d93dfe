"""PHALP and its HMAR, built from upstream classes for frame-by-frame streaming (needs hmr2 and phalp)."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import numpy as np

from gpu_worker.engines.hmr2_phalp.chunking import run_in_chunks
from gpu_worker.engines.hmr2_phalp.geometry import HMR2_BBOX_SHAPE, HMR2_CROP_PX, HMR2_FOCAL_PX
from gpu_worker.engines.hmr2_phalp.patches import cuda_calls_on, in_float32
from gpu_worker.engines.hmr2_phalp.settings import Settings
from pose_common import memplan

log = logging.getLogger(__name__)


def build_phalp_config(settings: Settings, device: str) -> Any:
    """phalp.configs.base.FullConfig with rendering off and this engine's tracking options."""
    from omegaconf import OmegaConf
    from phalp.configs.base import FullConfig

    cfg = OmegaConf.structured(FullConfig)
    cfg.video.source = "<frames pushed by pose-service>"
    cfg.device = device
    cfg.render.enable = False
    cfg.detect_shots = False
    cfg.use_gt = False
    cfg.phalp.detector = settings.phalp_detector
    cfg.phalp.low_th_c = settings.low_th_c
    cfg.phalp.small_w = settings.small_w
    cfg.phalp.small_h = settings.small_h
    cfg.phalp.n_init = settings.n_init
    cfg.phalp.max_age_track = settings.max_age_track
    cfg.phalp.track_history = settings.track_history
    return cfg


def crop_chunk_for(settings: Settings, device: str, precision: str) -> int:
    """How many person crops one HMR2/HMAR forward takes: engine.options.crop_chunk when set, else
    the memory plan's chunk for this rung in this precision (within the need the plan reports)."""
    if settings.crop_chunk > 0:
        return settings.crop_chunk
    rung = {"engine": "hmr2_phalp", "device": str(device), "options": {"detector": settings.detector}}
    return memplan.crop_chunk(rung, precision)


def build_streaming_phalp(cfg: Any, hmr2_model: Any, settings: Settings, appearance: str,
                          precision: str = "fp32") -> Any:
    """A PHALP whose HMAR is HMR2 (as track.py's HMR2_4dhuman), built without detector, visualizer,
    downloads or output folders, whose .cuda()-calling methods run on the engine's device, and whose
    HMAR takes a frame's crops in chunks the memory plan sized."""
    from hmr2.datasets.utils import expand_bbox_to_aspect_ratio
    from phalp.trackers.PHALP import PHALP

    adapter_class = hmr2_hmar_adapter_class()
    crop_chunk = crop_chunk_for(settings, cfg.device, precision)
    log.info("crop_chunk: %d person crops per HMR2/HMAR forward (%s)", crop_chunk,
             "engine.options.crop_chunk" if settings.crop_chunk > 0 else f"memory plan, {precision}")

    class StreamingPHALP(PHALP):
        def cached_download_from_drive(self, additional_urls=None):
            pass  # the weights stage verified every file; never wget into the CWD

        def setup_hmr(self):
            self.HMAR = adapter_class(self.cfg, hmr2_model, appearance, crop_chunk)

        def setup_detectron2(self):
            self.detector = None  # built by the engine's "detector" stage; the X101 is never built

        def setup_visualizer(self):
            self.visualizer = None  # no renderer, no OpenGL context

        def default_setup(self):
            pass  # PHALP.track's output folders are not used

        def get_detections(self, image, frame_name, t_, additional_data=None, measurments=None):
            found = super().get_detections(image, frame_name, t_, additional_data or {}, measurments)
            bbox, _, masks, scores, classes, gt_tids, gt_annots = found
            padded = expand_bbox_to_aspect_ratio(bbox, HMR2_BBOX_SHAPE)
            return bbox, padded, masks, scores, classes, gt_tids, gt_annots

        def get_human_features(self, *args, **kwargs):
            with cuda_calls_on(self.device):
                detections = super().get_human_features(*args, **kwargs)
            vertices = getattr(self.HMAR, "last_vertices", None)
            if settings.video_vertices and detections and vertices is not None:
                # detections follow the order of the crops HMAR just ran on
                for detection, verts in zip(detections, vertices):
                    detection.detection_data["vertices"] = verts.float().cpu().numpy()
            return detections

        def get_uv_distance(self, t_uv, d_uv):
            with cuda_calls_on(self.device):
                return super().get_uv_distance(t_uv, d_uv)

        def forward_for_tracking(self, vectors, attibute="A", time=1):
            with cuda_calls_on(self.device):
                return super().forward_for_tracking(vectors, attibute, time)

    return StreamingPHALP(cfg)


def forward_in_chunks(hmar: Any, crops: Any) -> dict:
    """PHALP passes every crop of a frame to its HMAR at once; they run `hmar.crop_chunk` at a time
    through `hmar.forward_crops`, and the meshes are kept aside for the vertices PHALP does not ask for."""
    out = run_in_chunks(hmar.forward_crops, crops, hmar.crop_chunk)
    hmar.last_vertices = out.pop("pred_vertices")
    return out


def hmr2_hmar_adapter_class() -> type:
    """Stands where PHALP expects its HMAR: HMR2 gives the body, PHALP's HMAR keeps giving the
    appearance encoder and 3D/2D joint computation (as in 4D-Humans' track.py)."""
    import torch
    import torch.nn.functional as F
    from phalp.configs.base import CACHE_DIR
    from phalp.models.hmar.hmr import HMR2018Predictor

    class HMR2AsHMAR(HMR2018Predictor):
        def __init__(self, cfg, hmr2_model, appearance: str, crop_chunk: int):
            super().__init__(cfg)  # PHALP's HMAR: uv sampler, appearance autoencoder, SMPL (45 joints)
            self.model = hmr2_model
            self.appearance = appearance
            self.crop_chunk = crop_chunk
            self.last_vertices = None
            self.autocast = contextlib.nullcontext  # the engine's precision context (fp32: none)
            if appearance == "texture":
                self._setup_texture_sampler(hmr2_model.smpl.faces)

        def _setup_texture_sampler(self, faces: np.ndarray) -> None:
            import neural_renderer

            uv_bary = np.load(os.path.join(CACHE_DIR, "phalp/3D/bmap_256.npy"))
            uv_face = np.load(os.path.join(CACHE_DIR, "phalp/3D/fmap_256.npy"))
            self.register_buffer("uv_bary", torch.tensor(uv_bary, dtype=torch.float))
            self.register_buffer("uv_face", torch.tensor(uv_face, dtype=torch.long))
            self.register_buffer("mesh_faces", torch.tensor(np.asarray(faces, dtype=np.int64)))
            self.depth_renderer = neural_renderer.Renderer(
                dist_coeffs=None, orig_size=HMR2_CROP_PX, image_size=HMR2_CROP_PX,
                light_intensity_ambient=1, light_intensity_directional=0, anti_aliasing=False)

        def forward(self, x):
            return forward_in_chunks(self, x)

        def forward_crops(self, x):
            rgb, mask = x[:, :3], x[:, 3].clamp(0, 1)
            with self.autocast():
                out = in_float32(self.model({"img": rgb, "mask": mask}))
            if self.appearance == "texture":
                uv_image = self._sample_texture(rgb, mask, out)
                uv_vector = self.hmar_old.process_uv_image(uv_image)
            else:
                # HMAR.forward already turned its uv image into the autoencoder's input, in place:
                # processing it again would make every texel count as visible
                with self.autocast():
                    appearance = in_float32(self.hmar_old(x))
                uv_image, uv_vector = appearance["uv_image"], appearance["uv_vector"]
            return {"uv_image": uv_image, "uv_vector": uv_vector, "pose_smpl": out["pred_smpl_params"],
                    "pred_cam": out["pred_cam"], "pred_vertices": out["pred_vertices"]}

        def _sample_texture(self, rgb, mask, out):
            """Colour each texel of the SMPL uv atlas from the crop where that surface point is visible."""
            verts = out["pred_vertices"] + out["pred_cam_t"].unsqueeze(1)
            batch, device = verts.shape[0], verts.device
            texels = self.uv_face >= 0
            corners = verts[:, self.mesh_faces[self.uv_face[texels]]]            # B,N,3 corners,3
            points = (corners * self.uv_bary[texels][None, :, :, None]).sum(2)  # B,N,3
            grid = (HMR2_FOCAL_PX / (HMR2_CROP_PX / 2)) * points[..., :2] / points[..., 2:3]
            intrinsics = torch.tensor([[HMR2_FOCAL_PX, 0, HMR2_CROP_PX / 2], [0, HMR2_FOCAL_PX, HMR2_CROP_PX / 2],
                                       [0, 0, 1]], device=device, dtype=torch.float)[None]
            depth_map = self.depth_renderer(
                verts, self.mesh_faces[None].expand(batch, -1, -1).int(), mode="depth", K=intrinsics,
                R=torch.eye(3, device=device)[None], t=torch.zeros(1, 3, device=device))
            surface = F.grid_sample(depth_map[:, None], grid[:, None], align_corners=False)[:, 0, 0]
            colours = F.grid_sample(torch.cat([rgb, mask[:, None]], 1), grid[:, None], align_corners=False)[:, :, 0]
            visible = points[..., 2] <= surface + 1e-4
            colours[:, 3] = colours[:, 3] * visible
            uv_image = torch.zeros((batch, 4, HMR2_CROP_PX, HMR2_CROP_PX), dtype=torch.float, device=device)
            uv_image[:, :, texels] = colours
            return uv_image

    return HMR2AsHMAR

"""The legacy routes' shapes: pure translation from the native result, health and job views to the
words and fields the SnowboardingExplained backend and mobile app read (the contract is in
examples/MIGRATION.md). No I/O here."""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

from pose_common.angles import DEFAULT_MIN_VISIBILITY, joint_angles, main_person, visibilities
from pose_common.drawing import number_or as _num
from pose_common.job_states import LEGACY_WORDS

SERVICE = "pose-service"


KNOWN_MODELS = ("hmr2", "vitdet", "phalp", "mediapipe")


STATE_WORDS = LEGACY_WORDS  # the app's backend reads these words (pose_common.job_states says which)


def _finite(value: Any, default: float = 0.0) -> float:
    """number_or with a float default, typed as the float it then always is."""
    number = _num(value, default)
    return default if number is None else number


def engine_name_of(health: dict) -> str:
    return str(health.get("engine_name") or (health.get("engine") or {}).get("name") or "unknown")


def detector_of(health: dict) -> Optional[str]:
    return health.get("detector") or (health.get("engine") or {}).get("detector")


def models_for(engine: str, detector: Optional[str], loaded: bool) -> dict:
    """{hmr2, vitdet, phalp, mediapipe: loaded|not_loaded}: what this engine really has in memory."""
    models = {name: "not_loaded" for name in KNOWN_MODELS}
    if not loaded:
        return models
    if engine == "hmr2_phalp":
        models["hmr2"] = models["phalp"] = "loaded"
        models[detector or "vitdet"] = "loaded"
    else:
        models[engine] = "loaded"
    return models


def legacy_health(health: Optional[dict], error: Optional[str] = None) -> dict:
    now = round(time.time(), 3)
    if health is None:
        return {"status": "not_ready", "service": SERVICE, "ready": False, "hybrid_available": False,
                "models": models_for("", None, False), "error": error or "supervisor unavailable",
                "timestamp": now}
    native = health.get("status")
    ready = native in ("ready", "degraded")
    status = "ready" if ready else "error" if native == "fatal" else "warming_up"
    engine = engine_name_of(health)
    body = {"status": status, "service": SERVICE, "ready": ready, "hybrid_available": ready,
            "models": models_for(engine, detector_of(health), ready),
            "device": health.get("device"), "engine": engine,
            "engine_info": health.get("engine") if ready else None,
            "worker": health.get("worker"), "stage": health.get("stage"), "rung": health.get("rung"),
            "degraded": native == "degraded", "reason": health.get("reason"),
            "queue_depth": health.get("queue_depth"), "running_job": health.get("running_job"),
            "timestamp": now}
    if status == "error":
        body["error"] = health.get("reason") or "service is fatal"
    return body


def warmup_body(health: dict, diagnostics: dict) -> dict:
    engine = engine_name_of(health)
    boots = diagnostics.get("boots") or []
    stages = {s.get("name"): _finite(s.get("duration_s")) for s in (boots[-1].get("stages") or [])} if boots else {}
    total = round(sum(stages.values()), 4)
    body = {"status": "ready", "ready": True, "engine": engine, "device": health.get("device"),
            "models": models_for(engine, detector_of(health), True),
            "load_time_seconds": total, "degraded": health.get("status") == "degraded",
            "reason": health.get("reason")}
    body[engine] = {"status": "loaded", "load_time_seconds": total, "stages": stages}
    if engine == "hmr2_phalp":
        detector = detector_of(health) or "vitdet"
        body["hmr2"] = {"status": "loaded", "load_time_seconds": stages.get("main_model")}
        body["phalp"] = {"status": "loaded", "load_time_seconds": stages.get("tracker")}
        body[detector] = {"status": "loaded", "load_time_seconds": stages.get("detector")}
    for name in ("hmr2", "vitdet"):
        body.setdefault(name, {"status": "not_loaded", "load_time_seconds": None,
                               "reason": f"the running engine is {engine}"})
    return body


def truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def frame_number_of(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value
    return 0 if value is None else value


def keypoint_rows(person: dict, names: Sequence[str]) -> list[dict]:
    """Engine person -> [{name, x, y, z, confidence, x_3d, y_3d, z_3d}] (pixels; metres)."""
    kp2 = person.get("keypoints_2d") or []
    kp3 = person.get("keypoints_3d") or []
    rows = []
    for i, point in enumerate(kp2):
        world = kp3[i] if i < len(kp3) and kp3[i] else [None, None, None]
        x3, y3, z3 = (_num(v) for v in (list(world) + [None] * 3)[:3])
        rows.append({"name": names[i] if i < len(names) else f"joint_{i}",
                     "x": _num(point[0]), "y": _num(point[1]), "z": z3,
                     "confidence": _num(point[2] if len(point) > 2 else None),
                     "x_3d": x3, "y_3d": y3, "z_3d": z3})
    return rows


def hybrid_response(reply: dict, frame_number: Any, processing_ms: float,
                    min_visibility: float = DEFAULT_MIN_VISIBILITY) -> dict:
    """The supervisor's IMAGE reply -> app.py's /pose/hybrid shape (contract §2.2). An angle whose joints
    are seen below `min_visibility` (angles.min_visibility) is null."""
    engine = reply.get("engine") or {}
    names = reply.get("joint_names") or []
    persons = reply.get("persons") or []
    person = main_person(persons)
    body: dict[str, Any] = {
        "frame_number": frame_number, "frame_width": reply.get("width"), "frame_height": reply.get("height"),
        "processing_time_ms": round(processing_ms, 2), "inference_time_ms": reply.get("ms"),
        "model_version": f"{engine.get('name', 'unknown')}-{engine.get('version', 'unknown')}",
        "engine": engine.get("name"), "device": engine.get("device"),
        "persons_detected": len(persons), "mesh_rendered": False,
    }
    if person is None:
        body.update(keypoints=[], keypoint_count=0, has_3d=False, joints_3d_raw=[], joint_angles_3d={},
                    camera_translation=None, tracking_confidence=0.0, error="No person detected")
        return body
    keypoints = keypoint_rows(person, names)
    # a non-finite coordinate (null from the worker) stays null here: no invented 0,0,0 joints in the angles
    raw3d = [[_num(v, None) for v in (list(p or []) + [None] * 3)[:3]] for p in person.get("keypoints_3d") or []]
    camera = person.get("camera")
    body.update(keypoints=keypoints, keypoint_count=len(keypoints), has_3d=bool(raw3d), joints_3d_raw=raw3d,
                joint_angles_3d=joint_angles(names, raw3d, visibilities(person), min_visibility),
                camera_translation=[_num(camera.get(k)) for k in ("tx", "ty", "tz")] if camera else None,
                tracking_confidence=_num(person.get("score")), bbox=person.get("bbox_xyxy"), error=None)
    if camera:
        body["scaled_focal_length"] = camera.get("focal_length")
    if person.get("camera_bbox"):
        scale, tx, ty = (list(person["camera_bbox"]) + [0, 0, 0])[:3]
        body["camera_params"] = {"scale": scale, "tx": tx, "ty": ty, "type": "weak_perspective"}
    if person.get("vertices"):
        body["mesh_vertices_data"] = person["vertices"]
        body["mesh_vertices"] = len(person["vertices"])
        faces = person.get("faces") or reply.get("mesh_faces")
        if faces:
            body["mesh_faces_data"] = faces
    return body


def legacy_person(person: dict, names: Sequence[str], faces: Optional[list]) -> dict:
    camera = person.get("camera")
    smpl = person.get("smpl")
    out = {
        "personId": person.get("track_id", 0), "confidence": _num(person.get("score")), "tracked": True,
        "bbox": person.get("bbox_xyxy"),
        "keypoints": [{k: row[k] for k in ("name", "x", "y", "z", "confidence")}
                      for row in keypoint_rows(person, names)],
        "camera": {"tx": camera.get("tx"), "ty": camera.get("ty"), "tz": camera.get("tz"),
                   "focalLength": camera.get("focal_length")} if camera else None,
        "smpl": {"globalOrient": smpl.get("global_orient"), "bodyPose": smpl.get("body_pose"),
                 "betas": smpl.get("betas")} if smpl else None,
    }
    if person.get("vertices"):
        out["meshVertices"] = person["vertices"]
        if person.get("faces") or faces:
            out["meshFaces"] = person.get("faces") or faces
    return out


def output_path_of(job: dict) -> str:
    return job.get("overlay_path") or job["result_path"]


def legacy_result(native: dict, processing_time: float, output_path: Optional[str] = None,
                  output_size_mb: Optional[float] = None, min_visibility: float = DEFAULT_MIN_VISIBILITY) -> dict:
    """Native result JSON (pose_common.results) -> what the backend and the app read (contract §2.3-2.4):
    `frames` (the frames document: persons with keypoints, camera, smpl, meshes) and the app's own
    VideoMeshProcessor shape (`pose_timeline`, `frame_acceptance`, `output_size_mb`, ...). frameNumber
    is the frame's position in the result, originalFrameNumber its index in the video (they differ when
    max_frames sampled the video). Every decoded frame is present; timestamps are real pts in seconds."""
    video = native.get("video") or {}
    fps = _num(video.get("fps"), 30.0) or 30.0
    names = native.get("joint_names") or []
    faces = native.get("mesh_faces")
    entries = with_gaps_filled(native.get("frames") or [], fps) if not video.get("max_frames") else \
        list(native.get("frames") or [])
    frames = [legacy_frame(position, frame, fps, names, faces) for position, frame in enumerate(entries)]
    timeline = [timeline_frame(position, frame, fps, names, min_visibility)
                for position, frame in enumerate(entries)]
    count = len(frames)
    width, height = video.get("width"), video.get("height")
    duration = _num(video.get("duration_s")) or (count / fps if fps else 0.0)
    engine = native.get("engine") or {}
    seconds = round(_finite(processing_time), 3)
    result = {
        "job_id": native.get("job_id"), "video_path": native.get("video_path"), "status": "complete",
        "frames": frames, "pose_timeline": timeline,
        "frame_acceptance": [{"frame_index": t["frameNumber"], "has_mesh": t["meshRendered"], "has_pose": t["has3D"],
                              "original_frame_number": t["originalFrameNumber"], "timestamp": t["timestamp"]}
                             for t in timeline],
        "fps": fps, "total_frames": count, "frame_count": count, "processed_frames": count,
        "frames_with_person": sum(1 for f in frames if f["persons"]),
        "video_duration": round(duration, 5), "processing_time": seconds, "processing_time_seconds": seconds,
        "resolution": [width, height], "output_path": output_path, "output_size_mb": output_size_mb,
        "metadata": {"fps": fps, "duration": round(duration, 5), "resolution": [width, height], "frameCount": count,
                     "engine": engine, "jointNames": names},
    }
    if video.get("truncated"):
        result.update(truncated=True, frames_expected=video.get("frames_expected"),
                      frames_decoded=video.get("frame_count"))
    if native.get("warning"):
        result["warning"] = native["warning"]
    return result


def with_gaps_filled(entries: list, fps: float) -> list:
    """Never expected (the supervisor stores every frame): keep frameNumber == position anyway."""
    filled: list[dict] = []
    for frame in entries:
        while len(filled) < int(frame["frame_index"]):
            missing = len(filled)
            filled.append({"frame_index": missing, "pts_s": missing / fps, "persons": [],
                           "error": "frame missing from the result"})
        if int(frame["frame_index"]) == len(filled):
            filled.append(frame)
    return filled


def frame_time(frame: dict, fps: float) -> float:
    pts = frame.get("pts_s")
    return round(_finite(pts, frame["frame_index"] / fps) if pts is not None else frame["frame_index"] / fps, 6)


def legacy_frame(position: int, frame: dict, fps: float, names: Sequence[str], faces: Optional[list]) -> dict:
    entry = {"frameNumber": position, "originalFrameNumber": int(frame["frame_index"]),
             "timestamp": frame_time(frame, fps),
             "persons": [legacy_person(p, names, faces) for p in frame.get("persons") or []]}
    if frame.get("error"):
        entry["error"] = frame["error"]
    return entry


def timeline_frame(position: int, frame: dict, fps: float, names: Sequence[str],
                   min_visibility: float = DEFAULT_MIN_VISIBILITY) -> dict:
    """One pose_timeline item as the mobile app's VideoAnalysisScreen reads it (the main person)."""
    person = main_person(frame.get("persons") or [])
    rows = keypoint_rows(person, names) if person else []
    raw3d = [list(p) for p in (person.get("keypoints_3d") or [])] if person else []
    return {"frameNumber": position, "originalFrameNumber": int(frame["frame_index"]),
            "timestamp": round(frame_time(frame, fps), 3), "confidence": _num(person.get("score")) if person else 0.0,
            "keypoints": rows, "joints3D": raw3d,
            "jointAngles": joint_angles(names, raw3d, visibilities(person), min_visibility) if raw3d and person else {},
            "has3D": bool(raw3d), "meshRendered": bool(person and person.get("vertices"))}


def processing_time_of(job: dict) -> float:
    start = job.get("started_at") or job.get("created_at")
    end = job.get("finished_at") or time.time()
    return max(0.0, end - start) if start else 0.0


def job_error_status(error: str) -> int:
    """A failed synchronous job: the service's state (503), a cancel (409), or the video itself (422)."""
    if error.startswith("service fatal"):
        return 503
    return 409 if error == "cancelled" else 422


def refused_status(job: dict) -> dict:
    """A video refused before queueing, as the app polls it: status error, the native answer's reason."""
    return {"job_id": job["job_id"], "status": "error", "created_at": job.get("created_at"),
            "error": job["error"], "code": job.get("code"), "http_status": job.get("http_status")}

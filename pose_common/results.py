"""The native result, assembled from the ledger one batch of frames at a time: as a JSON document,
as NDJSON lines (also while the job still runs), or into the results file. Only `document` holds a
whole video's frames in memory, for the shapes that need them at once (the legacy result, the PHALP
pickle). Mesh vertices are stored as float16 and included only on request."""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np

from pose_common.ledger import Job, SqlLedger

VIDEO_KEYS = ("fps", "width", "height", "duration_s", "rotation", "codec")
VERTEX_DTYPE = np.float16


def mesh_faces_key(engine_name: str) -> str:
    return f"mesh_faces:{engine_name}"


def pack_vertices(vertices: Any) -> bytes:
    """6890x3 metres as float16 (~41 KB instead of ~200 KB of JSON per person-frame): about 0.5 mm
    of precision at a metre, finer than the model's own error."""
    return np.asarray(vertices, dtype=np.float32).reshape(-1, 3).astype(VERTEX_DTYPE).tobytes()


def unpack_vertices(blob: bytes) -> list:
    return np.round(np.frombuffer(blob, dtype=VERTEX_DTYPE).reshape(-1, 3).astype(np.float32), 5).tolist()


def split_meshes(persons: list[dict]) -> dict[int, bytes]:
    """Take the vertices out of the persons (they are stored apart, compactly). -> {track_id: blob}"""
    meshes = {}
    for n, person in enumerate(persons):
        vertices = person.pop("vertices", None)
        if vertices is not None:
            packed = vertices if isinstance(vertices, bytes) else pack_vertices(vertices)
            meshes[int(person.get("track_id", n))] = packed
    return meshes


def video_facts(job: Job) -> dict[str, Any]:
    meta = job.meta()
    video = {k: meta.get(k) for k in VIDEO_KEYS}
    declared = meta.get("frame_count") or None
    decoded = job.frames_decoded if job.frames_decoded is not None else meta.get("frames_decoded")
    video.update(frame_count=decoded, container_frame_count=declared,
                 frames_expected=meta.get("frames_expected", declared), truncated=bool(meta.get("truncated")))
    if job.max_frames:
        video["max_frames"] = job.max_frames
    return video


# what ran the job: name, version and device always; the others where the engine has them (hmr2_phalp)
ENGINE_FACTS = ("name", "version", "device")
ENGINE_EXTRAS = ("detector", "precision", "tf32", "appearance", "hmr2_runtime", "person_detector")


def engine_facts(engine: dict[str, Any]) -> dict[str, Any]:
    return {**{k: engine.get(k) for k in ENGINE_FACTS}, **{k: engine[k] for k in ENGINE_EXTRAS if k in engine}}


def header(job: Job, ledger: SqlLedger, with_vertices: bool = False) -> dict[str, Any]:
    engine = job.engine()
    head: dict[str, Any] = {"job_id": job.job_id, "video": video_facts(job),
                            "engine": engine_facts(engine),
                            "joint_names": engine.get("joint_names") or []}
    if with_vertices:
        faces = ledger.get_blob(mesh_faces_key(engine.get("name") or ""))
        if faces is not None:
            head["mesh_faces"] = faces  # once per result, not per person
    if job.warning:
        head["warning"] = job.warning
    return head


def frames(job: Job, ledger: SqlLedger, with_vertices: bool = False, after: int = -1) -> Iterator[dict]:
    for frame in ledger.iter_frames(job.job_id, after=after, with_vertices=with_vertices):
        for person in frame["persons"]:
            if isinstance(person.get("vertices"), bytes):
                person["vertices"] = unpack_vertices(person["vertices"])
        yield frame


def summary(job: Job, frame_count: int, with_person: int) -> dict[str, Any]:
    return {"frames": frame_count, "frames_with_person": with_person, "attempts": job.attempts, **job.facts()}


def json_chunks(job: Job, ledger: SqlLedger, with_vertices: bool = False) -> Iterator[str]:
    """The native result document, in pieces."""
    yield json.dumps(header(job, ledger, with_vertices))[:-1] + ', "frames": ['
    count = with_person = 0
    for frame in frames(job, ledger, with_vertices):
        yield ("," if count else "") + json.dumps(frame)
        count += 1
        with_person += bool(frame["persons"])
    yield f'], "summary": {json.dumps(summary(job, count, with_person))}}}'


def document(job: Job, ledger: SqlLedger, with_vertices: bool = False) -> dict[str, Any]:
    """The whole native result in memory, for the shapes that need all of it at once (the legacy
    result, the PHALP pickle); everything else streams json_chunks or frames."""
    doc = header(job, ledger, with_vertices)
    doc["frames"] = list(frames(job, ledger, with_vertices))
    doc["summary"] = summary(job, len(doc["frames"]), sum(bool(f["persons"]) for f in doc["frames"]))
    return doc


def write_result(path: str, job: Job, ledger: SqlLedger) -> None:
    """An export of the result beside the overlay, for people and tools; the service never reads it back."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as out:
        for chunk in json_chunks(job, ledger):
            out.write(chunk)
    os.replace(tmp, path)


"""A job's report: one self-contained HTML page (no network resources, works from a file) with the
overlay video, a per-frame strip of persons found and their confidence, the joint angles the app's
coaching reads over time, the engine, and the job's restarts and crashes; for an SMPL engine with
stored meshes, a shaded render of a few frames. Plots are drawn by matplotlib, on the CPU, in
whatever process builds the report (never the worker).

An angle is plotted only where the joints it needs are seen (pose_common.angles): a frame where the
legs are out of view is a gap in the knee and hip curves, not MediaPipe's guess of them.

`python -m pose_common.report LEDGER JOB_ID OUT.html [MIN_VISIBILITY]` (LEDGER: the SQLite path or
database URL; MIN_VISIBILITY: angles.min_visibility, default 0.65)."""
from __future__ import annotations

import base64
import html
import io
import json
import os
import sys
from typing import Optional

from pose_common.angles import DEFAULT_MIN_VISIBILITY, main_person, person_angles
from pose_common.drawing import number_or
from pose_common.ledger import Job, SqlLedger
from pose_common.ledger_open import open_ledger_at

PLOTTED_ANGLES = ("left_knee", "right_knee", "left_hip", "right_hip", "spine")
MESH_FRAMES = 3
MAX_INLINE_VIDEO_BYTES = 256 << 20


def build_report(ledger: SqlLedger, job: Job, overlay: Optional[str],
                 min_visibility: float = DEFAULT_MIN_VISIBILITY) -> str:
    frames = list(_frame_facts(ledger, job, min_visibility))
    names = job.engine().get("joint_names") or []
    found = sum(1 for f in frames if f["found"])
    second = [f["index"] for f in frames if f["second_pass"]]
    data = {"job_id": job.job_id, "frames": len(frames), "frames_with_person": found,
            "found": [int(f["found"]) for f in frames], "scores": [f["score"] for f in frames],
            "second_pass": second,
            "angles": {name: [f["angles"].get(name) for f in frames] for name in PLOTTED_ANGLES},
            "min_visibility": min_visibility}
    sections = [
        _summary(job, len(frames), found),
        _video(overlay),
        _figure("frames-found", "Persons found per frame", _strip_svg(frames),
                f"A person was found in {found} of {len(frames)} frames"
                + (f" ({len(second)} of them by the second pass, which looks again where the first found nobody)."
                   if second else ".")),
        _figure("joint-angles", "Joint angles over time", _angles_svg(frames, names),
                "Knees (hip–knee–ankle), hips (shoulder–hip–knee) and the spine's lean from vertical, degrees; "
                f"only where the engine sees the joints (visibility ≥ {min_visibility:g}), a gap elsewhere."),
        _mesh(ledger, job, frames),
        _incidents(ledger, job),
    ]
    return PAGE.format(title=html.escape(f"pose-service report {job.job_id}"), style=STYLE,
                       body="\n".join(s for s in sections if s), data=json.dumps(data).replace("</", "<\\/"))


def _frame_facts(ledger: SqlLedger, job: Job, min_visibility: float):
    names = job.engine().get("joint_names") or []
    for frame in ledger.iter_frames(job.job_id):
        person = main_person(frame["persons"])
        angles = person_angles(person, names, min_visibility) if person else {}
        yield {"index": frame["frame_index"], "t": frame.get("pts_s"), "found": bool(frame["persons"]),
               "count": len(frame["persons"]), "score": number_or(person.get("score"), None) if person else None,
               "angles": angles, "error": frame.get("error"),
               "second_pass": bool(person and str(person.get("found_by", "")).startswith("second_pass"))}


def _summary(job: Job, frame_count: int, found: int) -> str:
    engine, video = job.engine(), job.meta()
    rows = [("Job", job.job_id), ("Video", os.path.basename(job.video_path)), ("Status", job.state),
            ("Engine", f"{engine.get('name')} {engine.get('version')}"),
            ("Device", engine.get("device")), ("Rung", engine.get("rung") or "—"),
            ("Frames", f"{frame_count} ({found} with a person)"),
            ("Video facts", f"{video.get('width')}×{video.get('height')}, {number_or(video.get('fps'), 0):.2f} fps, "
                            f"{number_or(video.get('duration_s'), 0):.2f} s"),
            ("Attempts", job.attempts)]
    if job.warning:
        rows.append(("Warning", job.warning))
    if job.error:
        rows.append(("Error", job.error))
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<section id="summary"><h1>Pose report</h1><table>{cells}</table></section>'


def _video(overlay: Optional[str]) -> str:
    if not overlay or not os.path.isfile(overlay):
        return '<section id="video"><h2>Overlay</h2><p>No overlay video for this job.</p></section>'
    if os.path.getsize(overlay) > MAX_INLINE_VIDEO_BYTES:
        return (f'<section id="video"><h2>Overlay</h2><p>The overlay is too large to embed; it is at '
                f'{html.escape(overlay)}.</p></section>')
    with open(overlay, "rb") as fh:
        encoded = base64.b64encode(fh.read()).decode()
    return (f'<section id="video"><h2>Overlay</h2><video id="overlay" controls muted playsinline preload="auto" '
            f'src="data:video/mp4;base64,{encoded}"></video></section>')


def _figure(anchor: str, title: str, svg: str, caption: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{svg}<p>{html.escape(caption)}</p></section>'


def _svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _strip_svg(frames: list[dict]) -> str:
    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(10, 1.8))
    found, second, missed = "#2a9d8f", "#e9c46a", "#e76f51"
    ax.bar([f["index"] for f in frames], [f["score"] or 0.02 if f["found"] else 1.0 for f in frames], width=1.0,
           color=[(second if f["second_pass"] else found) if f["found"] else missed for f in frames])
    ax.legend(handles=[Patch(color=found, label="person (height: confidence)"),
                       Patch(color=second, label="found by the second pass"), Patch(color=missed, label="nobody")],
              loc="lower right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("frame")
    ax.set_ylabel("confidence")
    return _svg(fig)


def _angles_svg(frames: list[dict], names: list[str]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3))
    xs = [f["t"] if f["t"] is not None else f["index"] for f in frames]
    for name in PLOTTED_ANGLES:
        ys = [f["angles"].get(name) for f in frames]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], label=name.replace("_", " "), linewidth=1.2)
    ax.set_xlabel("seconds" if frames and frames[0]["t"] is not None else "frame")
    ax.set_ylabel("degrees")
    ax.set_ylim(0, 180)
    if ax.lines:
        ax.legend(loc="upper right", fontsize=8, ncol=5)
    return _svg(fig)


def _mesh(ledger: SqlLedger, job: Job, frames: list[dict]) -> str:
    """A shaded render of a few frames' meshes, when the engine stored them (SMPL engines)."""
    from pose_common.results import mesh_faces_key, unpack_vertices

    faces = ledger.get_blob(mesh_faces_key(job.engine().get("name") or ""))
    chosen = _spread([f["index"] for f in frames if f["found"]], MESH_FRAMES)
    meshes = []
    for frame in ledger.iter_frames(job.job_id, with_vertices=True):
        if frame["frame_index"] in chosen:
            person = next((p for p in frame["persons"] if isinstance(p.get("vertices"), bytes)), None)
            if person is not None:
                meshes.append((frame["frame_index"], unpack_vertices(person["vertices"])))
    if faces is None or not meshes:
        return ""
    plt = _pyplot()
    fig = plt.figure(figsize=(3.2 * len(meshes), 3.6))
    for n, (index, vertices) in enumerate(meshes):
        ax = fig.add_subplot(1, len(meshes), n + 1, projection="3d")
        xs, ys, zs = zip(*vertices)
        ax.plot_trisurf(xs, [-z for z in zs], [-y for y in ys], triangles=faces, color="#a8dadc", linewidth=0,
                        shade=True)
        ax.set_title(f"frame {index}", fontsize=9)
        ax.set_axis_off()
    return _figure("mesh", "Body mesh (SMPL)", _svg(fig), "The engine's mesh of the rider on a few frames.")


def _spread(items: list[int], count: int) -> set[int]:
    if len(items) <= count:
        return set(items)
    return {items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)}


def _incidents(ledger: SqlLedger, job: Job) -> str:
    crashes = ledger.crashes(limit=50, job_id=job.job_id)
    if not crashes:
        return ('<section id="incidents"><h2>Restarts and crashes</h2>'
                '<p>None: the job ran on one worker without incident.</p></section>')
    rows = "".join(
        f"<tr><td>{html.escape(str(c.get('cause')))}</td><td>{html.escape(str(c.get('stage')))}</td>"
        f"<td>{html.escape(str(c.get('frame_index')))}</td><td>{html.escape(str(c.get('summary') or ''))}</td>"
        f"<td>{html.escape(str(c.get('remedy') or ''))}</td></tr>" for c in reversed(crashes))
    return ('<section id="incidents"><h2>Restarts and crashes</h2><table><tr><th>cause</th><th>stage</th>'
            f'<th>frame</th><th>what happened</th><th>remedy</th></tr>{rows}</table></section>')


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1d3557; }
table { border-collapse: collapse; } th, td { text-align: left; padding: 2px 10px; border-bottom: 1px solid #ddd; }
video { width: 100%; max-height: 70vh; background: #000; } svg { width: 100%; height: auto; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{style}</style></head>
<body>
{body}
<script type="application/json" id="report-data">{data}</script>
</body></html>
"""


def write_report(ledger_location: str, job_id: str, out: str,
                 min_visibility: float = DEFAULT_MIN_VISIBILITY) -> str:
    ledger = open_ledger_at(ledger_location, readonly=True)
    try:
        job = ledger.job(job_id)
        if job is None:
            raise KeyError(job_id)
        text = build_report(ledger, job, job.overlay_path, min_visibility)
    finally:
        ledger.close()
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (3, 4):
        print("usage: python -m pose_common.report LEDGER JOB_ID OUT.html [MIN_VISIBILITY]", file=sys.stderr)
        return 2
    min_visibility = float(args[3]) if len(args) == 4 else DEFAULT_MIN_VISIBILITY
    write_report(args[0], args[1], args[2], min_visibility)
    return 0


if __name__ == "__main__":
    sys.exit(main())


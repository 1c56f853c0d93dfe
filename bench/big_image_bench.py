"""What a big image costs the worker (issue 18 item 4): peak RSS over one /pose/hybrid-style image
request, through the real supervisor and worker, for the shared photo (1068x1600) and 7000x7000
JPEGs (the photo 4x inside it, and one with nobody in it, where the second pass runs), with the
images reduced to engine.image_max_side (now) and not reduced (engine.image_max_side=0: before).

Usage: python -m bench.big_image_bench
Prints a table and writes bench/results/big_image.json."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_big_images import big_image_with_the_photo, nobody_image, peak_rss_after  # noqa: E402

from support import PHOTO, Stack  # noqa: E402


def measure(label: str, overrides: list[str], images: dict[str, bytes]) -> list[dict]:
    rows = []
    stack = Stack(Path(tempfile.mkdtemp(prefix="big-image-bench-")),
                  ["engine.name=mediapipe", "probe.enabled=false", *overrides])
    try:
        stack.wait_ready(120)
        pid = stack.worker_pid()
        for name, data in images.items():
            peak, (status, body) = peak_rss_after(pid, lambda: stack.conn.request("image", timeout=180, blobs=[data]))
            rows.append({"run": label, "image": name, "status": status, "peak_rss_mb": peak >> 20,
                         "ms": body.get("ms"), "persons": len(body.get("persons") or []),
                         "worker_same": stack.worker_pid() == pid})
    finally:
        stack.stop()
    return rows


def main() -> int:
    if not PHOTO.exists():
        print(f"no photo at {PHOTO}")
        return 2
    images = {"photo 1068x1600": PHOTO.read_bytes(), "7000x7000 with the photo": big_image_with_the_photo(),
              "7000x7000 nobody": nobody_image()}
    rows = measure("before (image_max_side=0)", ["engine.image_max_side=0"], images) + \
        measure("after (image_max_side=1920)", [], images)
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "big_image.json").write_text(json.dumps(rows, indent=2))
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())

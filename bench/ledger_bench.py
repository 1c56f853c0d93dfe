"""Ledger overhead per frame and per claim: PostgreSQL (a throwaway server from Debian's packages)
vs the embedded SQLite, in one run so the ratio compares like with like.

Usage: python -m bench.ledger_bench [--frames 2000] [--claims 200]"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pose_common.ledger import Ledger, SqlLedger  # noqa: E402
from pose_common.ledger_pg import PgLedger  # noqa: E402

from support import PostgresServer  # noqa: E402

PERSON = {"track_id": 1, "score": 0.93, "bbox_xyxy": [100.5, 40.25, 180.0, 300.75],
          "keypoints_2d": [[120.5 + i, 60.25 + i, 0.98] for i in range(33)],
          "keypoints_3d": [[0.01 * i, -0.02 * i, 0.003 * i] for i in range(33)]}


def per_frame_s(ledger: SqlLedger, frames: int) -> float:
    ledger.accept("/bench.mp4")
    lease = ledger.claim("bench", 600).lease
    started = time.perf_counter()
    for index in range(frames):
        ledger.add_frame(lease, index, index / 30, [PERSON])
    return (time.perf_counter() - started) / frames


def per_claim_s(ledger: SqlLedger, claims: int) -> float:
    for _ in range(claims):
        ledger.accept("/bench.mp4")
    started = time.perf_counter()
    for _ in range(claims):
        ledger.claim("bench", 600)
    return (time.perf_counter() - started) / claims


def measure(ledger: SqlLedger, frames: int, claims: int) -> dict:
    return {"store_frame_ms": round(per_frame_s(ledger, frames) * 1000, 3),
            "claim_ms": round(per_claim_s(ledger, claims) * 1000, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.ledger_bench")
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--claims", type=int, default=200)
    args = parser.parse_args()
    sqlite = measure(Ledger(str(Path(tempfile.mkdtemp(prefix="pose-bench-")) / "l.sqlite3")), args.frames, args.claims)
    server = PostgresServer(durable=True)  # fsync on, like a production server
    try:
        postgres = measure(PgLedger(server.url), args.frames, args.claims)
    finally:
        server.destroy()
    out = {"sqlite": sqlite, "postgresql": postgres,
           "ratio_store_frame": round(postgres["store_frame_ms"] / sqlite["store_frame_ms"], 2),
           "ratio_claim": round(postgres["claim_ms"] / sqlite["claim_ms"], 2)}
    print(json.dumps(out, indent=2))
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "ledger.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

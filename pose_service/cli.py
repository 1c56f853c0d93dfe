"""`pose-service VERB [options] [hydra overrides...]`.

Verbs: serve, run, drill, diagnose, selftest, models verify|fetch|plan|import-smpl, install-service (and
supervisor / gateway, which serve starts).
Every verb takes Hydra overrides such as `gateway.port=5123 state_dir=/tmp/x engine.name=mediapipe`."""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from configs import Config


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra overrides are the `key=value` words (also `+key=`/`~key`); the rest is argparse's."""
    overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    return [a for a in argv if a not in overrides], overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pose-service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", default="pose_service", help="configs/<name>.yaml (e.g. gpu)")
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("serve", help="run gateway + supervisor + worker (the daemon)")
    verbs.add_parser("supervisor", help="run only the supervisor (serve starts it)")
    verbs.add_parser("gateway", help="run only the HTTP gateway (serve starts it)")

    run = verbs.add_parser("run", help="process one clip through a private supervisor and worker")
    run.add_argument("video", nargs="?", help="path to a video (any container ffmpeg reads)")
    run.add_argument("--out", default="result.json")
    run.add_argument("--demo", action="store_true", help="generate a short clip with a real person and use it")
    run.add_argument("--quiet", action="store_true")
    run.add_argument("--no-overlay", dest="overlay", action="store_false",
                     help="skip the overlay video (written next to --out by default)")
    run.add_argument("--report", default=None, metavar="HTML",
                     help="also write a one-page report (overlay, persons found, joint angles) to HTML")

    drill = verbs.add_parser("drill", help="inject a fault into a running daemon and report what it concluded")
    drill.add_argument("fault", help="segfault|abort|bus_error|kill|exit|hang|raise|cuda_oom|cuda_sticky|load_failure")
    drill.add_argument("--at", default=None, help="frame:N, stage:NAME or start (default: frame:5 of a drill clip)")
    drill.add_argument("--url", default=None, help="gateway URL (default from config)")
    drill.add_argument("--timeout", type=float, default=120.0)

    diagnose = verbs.add_parser("diagnose", help="load each engine stage in its own process and report")
    diagnose.add_argument("--engine", default=None)
    diagnose.add_argument("--device", default=None)
    diagnose.add_argument("--json", action="store_true")

    install = verbs.add_parser("install-service", help="write the systemd units for this checkout and venv")
    install.add_argument("--dry-run", action="store_true", help="print what would be written and run")
    install.add_argument("--user-unit", action="store_true", help="a per-user unit (no root)")
    install.add_argument("--gpu", type=int, action="append", help="per-GPU units pose-service@N (repeatable)")
    install.add_argument("--unit-dir", default=None, help="write the units here instead of systemd's directory")
    install.add_argument("--no-start", action="store_true", help="write the units only")
    install.add_argument("--no-token", action="store_true",
                         help="give the service no token (any local user may then call every route)")
    install.add_argument("--token-file", default=None,
                         help="the token file to create or keep (default /etc/pose-service/token; a user unit's "
                              "in ~/.config/pose-service; beside the units with --unit-dir)")

    models = verbs.add_parser("models", help="model files")
    models_verbs = models.add_subparsers(dest="models_verb", required=True)
    verify = models_verbs.add_parser("verify", help="list every file the engine needs: present, missing, truncated")
    verify.add_argument("--engine", default=None)
    verify.add_argument("--detector", default=None, help="default: the configured hmr2_phalp rung's")
    verify.add_argument("--json", action="store_true")
    import_smpl = models_verbs.add_parser("import-smpl", help="convert SMPLify's neutral pickle (chumpy) to plain "
                                                                "numpy in the HMR2 and PHALP caches")
    import_smpl.add_argument("path", help="basicModel_neutral_lbs_10_207_0_v1.0.0.pkl as downloaded")
    fetch = models_verbs.add_parser("fetch", help="download every file the configured hmr2_phalp rungs need "
                                                  "into the caches the engine reads (resumable)")
    fetch.add_argument("--detector", default=None, help="default: the configured hmr2_phalp rungs' detectors")
    fetch.add_argument("--dry-run", action="store_true", help="list what would be fetched and where; no network")
    fetch.add_argument("--mirror", default=None, metavar="URL",
                       help="fetch every file from URL + its original path (default $POSE_SERVICE_MODELS_MIRROR)")
    # NAME VALUE, not NAME=VALUE: a word with "=" is taken for a Hydra override
    fetch.add_argument("--source", nargs=2, action="append", metavar=("NAME", "URL"),
                       help="one file's URL (repeatable)")
    fetch.add_argument("--sha256", nargs=2, action="append", metavar=("NAME", "HEX"),
                       help="pin one file's sha256 (repeatable)")
    fetch.add_argument("--retries", type=int, default=2, help="resume a cut download this many times in one run")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    plan = models_verbs.add_parser("plan", help="each rung's GPU memory need and the rung a card would start on")
    plan.add_argument("--gpu-mb", type=int, default=None, help="the card's memory (default: NVML's total)")
    plan.add_argument("--json", action="store_true")
    selftest = verbs.add_parser("selftest", help="load and run every rung of the ladder on a built-in clip; "
                                                 "a report to paste into an issue")
    selftest.add_argument("--json", action="store_true")
    selftest.add_argument("--out", default=None, help="also write the report here")
    selftest.add_argument("--frames", type=int, default=12)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    os.umask(0o077)  # the ledger, uploads, results and sockets are this user's alone (children inherit it)
    argv = list(sys.argv[1:] if argv is None else argv)
    words, overrides = split_overrides(argv)
    args = build_parser().parse_args(words)
    from configs import ConfigError, load_config

    if args.verb == "run" and not any(o.split("=")[0].lstrip("+") == "state_dir" for o in overrides):
        overrides = [*overrides, f"state_dir={_temp_state_dir()}"]
    try:
        cfg = load_config(overrides, config_name=args.config_name)
    except ConfigError as exc:
        print(f"pose-service: {exc}", file=sys.stderr)
        return 2
    if args.verb in ("serve", "gateway"):
        from gateway.security import startup_refusal
        refusal = startup_refusal(cfg, served_host(cfg))
        if refusal:
            print(f"pose-service {args.verb}: refusing to start: {refusal}", file=sys.stderr)
            return 2
    if args.verb == "serve":
        from pose_service.service import main as serve
        return serve(cfg, overrides, args.config_name)
    if args.verb == "supervisor":
        from supervisor.arbiter import main as supervisor_main
        return supervisor_main(cfg)
    if args.verb == "gateway":
        from gateway.app import main as gateway_main
        return gateway_main(cfg)
    if args.verb == "run":
        from pose_service.verbs.run import run_clip
        return run_clip(cfg, args, overrides)
    if args.verb == "drill":
        from pose_service.verbs.drill import drill
        return drill(cfg, args)
    if args.verb == "diagnose":
        from pose_service.verbs.diagnose import diagnose
        return diagnose(cfg, args)
    if args.verb == "install-service":
        from pose_service.verbs.install import install_service
        return install_service(args)
    if args.verb == "models" and args.models_verb == "import-smpl":
        from pose_service.verbs.models_import_smpl import import_smpl_command
        return import_smpl_command(args)
    if args.verb == "models" and args.models_verb == "fetch":
        from pose_service.verbs.models_fetch import models_fetch
        return models_fetch(cfg, args)
    if args.verb == "models" and args.models_verb == "plan":
        from pose_service.verbs.models_plan import plan_command
        return plan_command(cfg, args)
    if args.verb == "models":
        from pose_service.verbs.models_verify import models_verify
        return models_verify(cfg, args)
    if args.verb == "selftest":
        from pose_service.verbs.selftest import selftest_command
        return selftest_command(cfg, args)
    return 2


def served_host(cfg: Config) -> str:
    """The address the gateway will really answer on: a listening socket handed to this process
    (systemd's socket unit, or serve's own to its gateway) wins over gateway.host."""
    import socket

    from pose_service.listener import HANDOVER_ENV, SD_LISTEN_FDS_START

    fd: Optional[str | int] = os.environ.get(HANDOVER_ENV)
    if fd is None and os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS", "0") != "0":
        fd = SD_LISTEN_FDS_START
    if fd is None:
        return cfg.gateway.host
    with socket.socket(fileno=os.dup(int(fd))) as sock:
        return "localhost" if sock.family == socket.AF_UNIX else sock.getsockname()[0]


def _temp_state_dir() -> str:
    import tempfile
    return tempfile.mkdtemp(prefix="pose-service-run-")


if __name__ == "__main__":
    sys.exit(main())

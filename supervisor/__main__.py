"""`python -m supervisor [--config-name NAME] [overrides...]`: the supervisor alone (serve starts it)."""
import os
import sys

from configs import load_config
from supervisor.arbiter import main

os.umask(0o077)
args = sys.argv[1:]
name = "pose_service"
if args[:1] == ["--config-name"] and len(args) > 1:
    name, args = args[1], args[2:]
sys.exit(main(load_config(args, config_name=name)))

import sys

from pose_service.cli import main

sys.exit(main(["supervisor", *sys.argv[1:]]))

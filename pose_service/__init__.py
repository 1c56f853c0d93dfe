"""pose-service's top floor: the CLI verbs (cli.py, commands.py and one module per larger verb) and
the service manager that `serve` runs (service.py). The wire protocol and logging live in pose_common."""
__version__ = "0.1.0"

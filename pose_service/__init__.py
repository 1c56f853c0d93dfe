"""pose-service's top floor: the CLI (cli.py, one module per verb in verbs/, the daemon-facing ones
sharing daemon_client.py) and the service manager that `serve` runs (service.py). The wire protocol
and logging live in pose_common."""
__version__ = "0.1.0"

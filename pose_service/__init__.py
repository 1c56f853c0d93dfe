"""pose-service: shared pieces used by all processes (wire protocol, logging, CLI)."""
__version__ = "0.1.0"

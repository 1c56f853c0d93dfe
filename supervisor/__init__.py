"""The supervisor: owns the job ledger and the worker's life (spawn, watch, decode deaths, restart)."""

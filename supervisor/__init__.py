"""The supervisor: the ledger's writer (jobs, frames, artifacts) and owner of the worker's life
(spawn, watch, decode deaths, restart, step down and up the ladder)."""

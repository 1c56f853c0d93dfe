"""The GPU worker: one spawned process that loads an engine in announced stages and processes
frames. It knows nothing of HTTP or the ledger; it talks only the wire protocol."""

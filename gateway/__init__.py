"""The HTTP gateway (aiohttp): validates what arrives, sends commands to the supervisor as protocol
messages, reads job state and results from the ledger (read-only); never touches the GPU."""

"""The HTTP gateway (aiohttp): validates, translates to protocol messages, never touches the GPU."""

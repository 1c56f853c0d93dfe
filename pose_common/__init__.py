"""The floor every process stands on: wire protocol, logging, media decoding, drawing, result
shapes, host facts and the runtime-dir layout. Nothing here imports gateway, supervisor, gpu_worker
or pose_service."""

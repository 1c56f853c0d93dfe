"""One module per CLI verb (`pose-service VERB`, dispatched by pose_service/cli.py). Verbs that talk
to a running daemon do it through one HTTP client, pose_service/daemon_client.py; `run` starts its
own private supervisor and talks to it over ZeroMQ (pose_common/client.py)."""

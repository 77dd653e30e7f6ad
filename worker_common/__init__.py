"""What the prefill and decode workers share: their command line and process lifecycle (``process.py``),
registration and heartbeats with the router (``registration.py``), a worker's exceptions as gRPC
statuses (``grpc_errors.py``), and the engine's part of their stats (``stats.py``)."""

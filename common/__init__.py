"""The vocabulary every process shares: what travels between router, workers and transport.

Torch-free and importing nothing else of kvferry, so every layer may use it: the compatibility
fingerprint (``fingerprint.py``), sampling parameters and token logprobs (``sampling.py``), worker
roles, stats and the refusals a worker answers with (``worker.py``), a request's phases and the
timings a worker reports (``timings.py``), and ``ConfigError`` (``errors.py``).
``kvferry.proto.convert`` is the one place these are turned into protobuf messages and back.
"""

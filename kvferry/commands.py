"""The `kvferry` sub-commands and their one-line help: read by the CLI and by the config file's sections."""

COMMANDS = {
    "generate": "generate text for one prompt and print it",
    "chat": "interactive chat with the model's chat template",
    "serve": "router + prefill and decode workers on this machine, supervised",
    "router": "run the router (HTTP OpenAI API + gRPC Generate)",
    "prefill": "run a prefill worker that registers with a router",
    "decode": "run a decode worker that registers with a router",
    "scale": "resize the pools of a `kvferry serve --ray` deployment at run time",
    "status": "the router's workers: roles, KV cache in use, load, heartbeats",
    "build-kernels": "compile the C++ CPU kernels for this machine (make setup does)",
    "bench": "benchmark an OpenAI-compatible server: goodput sweeps and plots",
}

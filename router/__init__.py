"""The router: OpenAI HTTP API and gRPC Generate in front of prefill and decode workers (docs/ROUTER.md)."""

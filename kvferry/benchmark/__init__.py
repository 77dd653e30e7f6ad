"""`kvferry bench`: a goodput benchmark client for any OpenAI-compatible server.

Datasets (``datasets``) and arrival times (``arrivals``) make a deterministic workload; ``client`` sends
one streaming request and times it; ``runner`` replays the workload at each request rate of a sweep;
``metrics`` turns the per-request records into latency percentiles, SLO attainment and goodput;
``report`` prints and stores them; ``plot`` draws them; ``cli`` is the command line.
"""

"""When each request is sent: a Poisson or gamma arrival process at a given rate, fixed by a seed.

Gaps between requests are gamma-distributed with shape ``burstiness`` and mean ``1 / rate`` (vLLM's
convention): burstiness 1 is a Poisson process (exponential gaps), below 1 burstier, above 1 more
regular. Rate ``inf`` sends every request at once.
"""

from __future__ import annotations

import math

import numpy as np


def parse_rates(text: str) -> list[float]:
    """``"0.1,0.2,inf"`` -> ``[0.1, 0.2, inf]``, in the order given."""
    rates = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            rate = math.inf if part in ("inf", "infinity") else float(part)
        except ValueError:
            raise ValueError(f"--request-rate: {part!r} is not a number or inf") from None
        if not rate > 0:
            raise ValueError(f"--request-rate: rates must be positive, got {part!r}")
        rates.append(rate)
    if not rates:
        raise ValueError("--request-rate: no rate given")
    return rates


def arrival_times(rate: float, num: int, burstiness: float, seed: int, round_index: int = 0) -> list[float]:
    """Send times in seconds from the start of the round: the first request at 0, then gamma gaps."""
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * num
    rng = np.random.default_rng([seed, round_index, 1])  # its own stream: prompts do not shift arrivals
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(0, num - 1))
    return [0.0, *np.cumsum(gaps).tolist()][:num]

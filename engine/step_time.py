"""A worker's model of its own step time, fitted online from the steps it runs. No I/O, no tensors.

A step's time is modelled as linear in what it carries (``StepShape``):

    seconds = w0 + w1 * decodes + w2 * prefill_tokens + w3 * decode_context + w4 * prefill_attention
              + w5 * mixed

``w0`` is reading the weights once (the whole cost of a small decode batch on a CPU), ``w1`` the per-row
cost of a decode (its share of the matmuls and sampling), ``w2`` a prefill token's matmuls,
``w3`` the KV a decode row attends to (memory bound: its context tokens), ``w4`` prefill attention
(each chunk token against every token before it: chunk length x chunk end), ``w5`` what a step pays
once for carrying decode rows and prompt tokens together (``mixed``: 1 for such a step, else 0). On a
CPU with quantized weights that is most of a small chunk's cost: the whole batch leaves the quantized
decode kernels for the dense prompt path (measured on SmolLM2-135M, 2 threads, 7 decode rows: 16
prompt tokens added 44 ms to a 30 ms step, ~2.7 ms a token against ~1.3 in a prompt computed whole),
and a model without the term predicted such steps ~30% short. Measured on SmolLM2-135M
with 2 threads, decode steps grow with context as much as with rows (16 rows at 1024 tokens of context
cost as much as 64 rows at 128), and prefill per token rises with prompt length, so neither term can
be dropped.

The fit is ridge regression with exponential forgetting (recent steps count most: a shared box's speed
drifts with what else runs) pulled toward a prior: a generic guess, or the coefficients a short
warm-up measured (``settle_prior``). Coefficients are kept non-negative (a negative cost would make the
scheduler plan unbounded batches). Features are scaled to be about 1 for a typical step, so the prior's
weight means the same for each.
"""

from __future__ import annotations

from dataclasses import dataclass

# Feature scales: a "typical" step's value of each feature (16 decode rows, 256 prefill tokens...).
SCALES = (1.0, 16.0, 256.0, 16384.0, 256.0 * 1024.0, 1.0)
# Seconds for a typical amount of each feature on a small CPU box (weights 20 ms, 16 rows 15 ms,
# 256 prefill tokens 250 ms, 16k context tokens 30 ms, 256x1024 prefill attention 50 ms, a mixed step's
# own cost 15 ms).
DEFAULT_PRIOR = (0.020, 0.015, 0.250, 0.030, 0.050, 0.015)


@dataclass(frozen=True)
class StepShape:
    num_decodes: int = 0  # single-token rows
    num_prefill_tokens: int = 0  # tokens of multi-token chunks
    decode_context_tokens: int = 0  # sum of the decode rows' context lengths
    prefill_attention: int = 0  # sum over chunks of chunk length x chunk end position

    @property
    def mixed(self) -> bool:
        """Decode rows and prompt tokens in one step."""
        return self.num_decodes > 0 and self.num_prefill_tokens > 0

    def features(self) -> tuple[float, ...]:
        raw = (1.0, self.num_decodes, self.num_prefill_tokens, self.decode_context_tokens, self.prefill_attention,
               float(self.mixed))
        return tuple(x / s for x, s in zip(raw, SCALES))


class StepTimeModel:
    def __init__(
        self, prior: tuple[float, ...] = DEFAULT_PRIOR, forget: float = 0.99, prior_weight: float = 2.0
    ) -> None:
        """``prior``: seconds per typical amount of each feature (see ``SCALES``); ``forget``: weight
        of a step one step older (0.99: about the last 100 steps count); ``prior_weight``: how many
        typical steps the prior is worth."""
        if len(prior) != len(SCALES) or any(p < 0 for p in prior):
            raise ValueError(f"the prior needs {len(SCALES)} non-negative coefficients")
        if not 0 < forget <= 1 or prior_weight <= 0:
            raise ValueError("need 0 < forget <= 1 and prior_weight > 0")
        self.forget = forget
        self.prior_weight = prior_weight
        self.prior = tuple(float(p) for p in prior)
        n = len(SCALES)
        self._xx = [[0.0] * n for _ in range(n)]  # sum of forget^age * x x^T
        self._xy = [0.0] * n  # sum of forget^age * x y
        self.num_observations = 0
        self._coef: tuple[float, ...] = self.prior

    # ---- fitting ---------------------------------------------------------------------------------
    def observe(self, shape: StepShape, seconds: float) -> None:
        if seconds <= 0:
            return
        x = shape.features()
        f = self.forget
        for i, xi in enumerate(x):
            row = self._xx[i]
            for j, xj in enumerate(x):
                row[j] = f * row[j] + xi * xj
            self._xy[i] = f * self._xy[i] + xi * seconds
        self.num_observations += 1
        self._coef = self._solve()

    def reset(self) -> None:
        """Forget every observation (the prior stays): e.g. after a first step that loaded kernels."""
        n = len(SCALES)
        self._xx = [[0.0] * n for _ in range(n)]
        self._xy = [0.0] * n
        self.num_observations = 0
        self._coef = self.prior

    def settle_prior(self) -> None:
        """The current fit becomes the prior (after a warm-up), and the observations start afresh."""
        self.prior = self._coef
        self.reset()

    def _solve(self) -> tuple[float, ...]:
        """Ridge toward the prior, non-negative (active set: a negative coefficient is fixed at 0)."""
        n = len(SCALES)
        lam = self.prior_weight
        free = list(range(n))
        coef = [0.0] * n
        for _ in range(n):
            a = [[self._xx[i][j] + (lam if i == j else 0.0) for j in free] for i in free]
            b = [self._xy[i] + lam * self.prior[i] for i in free]
            sol = _solve_linear(a, b)
            coef = [0.0] * n
            for k, i in enumerate(free):
                coef[i] = sol[k]
            negative = [i for i in free if coef[i] < 0]
            if not negative:
                break
            free = [i for i in free if i not in negative]
            coef = [max(c, 0.0) for c in coef]
        return tuple(coef)

    # ---- predicting ------------------------------------------------------------------------------
    @property
    def coefficients(self) -> tuple[float, ...]:
        """Seconds per unit of each feature (unscaled): w0..w4 of the module docstring."""
        return tuple(c / s for c, s in zip(self._coef, SCALES))

    def describe(self) -> str:
        w = self.coefficients
        return (f"{w[0] * 1e3:.1f} ms + {w[1] * 1e3:.2f} ms/decode row + {w[2] * 1e3:.3f} ms/prefill token + "
                f"{w[3] * 1e6:.2f} ms per 1k context tokens + {w[4] * 1e9:.2f} ms per 1M attention pairs + "
                f"{w[5] * 1e3:.1f} ms a mixed step "
                f"({self.num_observations} steps)")

    def predict(self, shape: StepShape) -> float:
        return sum(c * x for c, x in zip(self._coef, shape.features()))


def _solve_linear(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (the systems here are 5x5 and well conditioned)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        p = m[col][col]
        if abs(p) < 1e-300:
            continue
        for r in range(col + 1, n):
            factor = m[r][col] / p
            if factor:
                for c in range(col, n + 1):
                    m[r][c] -= factor * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        s = m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))
        x[r] = s / m[r][r] if abs(m[r][r]) > 1e-300 else 0.0
    return x

"""The step-time model: recovers known coefficients from synthetic steps, follows a machine that slows
down, keeps costs non-negative, and falls back to its prior without data."""

import random

import pytest

from kvferry.engine.step_time import DEFAULT_PRIOR, SCALES, StepShape, StepTimeModel

TRUE = (0.012, 0.0009, 0.0011, 2.0e-6, 2.0e-7, 0.025)  # seconds per unit of each feature


def true_time(shape: StepShape, w=TRUE) -> float:
    mixed = shape.num_decodes > 0 and shape.num_prefill_tokens > 0
    return (w[0] + w[1] * shape.num_decodes + w[2] * shape.num_prefill_tokens
            + w[3] * shape.decode_context_tokens + w[4] * shape.prefill_attention + w[5] * mixed)


def random_shape(rng: random.Random) -> StepShape:
    decodes = rng.choice([0, 1, 4, 8, 16, 32, 64])
    prefill = rng.choice([0, 0, 16, 64, 256, 512, 1024])
    context = decodes * rng.randint(16, 2048)
    start = rng.randint(0, 1024) if prefill else 0
    if decodes == 0 and prefill == 0:
        decodes, context = 1, 100
    return StepShape(decodes, prefill, context, prefill * (start + prefill))


def test_fits_known_synthetic_steps():
    rng = random.Random(0)
    model = StepTimeModel(forget=1.0, prior_weight=0.01)
    for _ in range(400):
        shape = random_shape(rng)
        model.observe(shape, true_time(shape) * rng.uniform(0.97, 1.03))
    for fitted, true in zip(model.coefficients, TRUE):
        assert fitted == pytest.approx(true, rel=0.08)
    probe = StepShape(24, 300, 24 * 700, 300 * 900)
    assert model.predict(probe) == pytest.approx(true_time(probe), rel=0.03)


def test_a_small_chunk_beside_decode_rows_pays_the_mixed_steps_own_cost():
    # As measured on a CPU: 16 prompt tokens beside 7 decode rows cost far more than 16 x the per-token
    # cost (the batch leaves the decode kernels); the fitted model must say so, or the scheduler
    # plans such steps short and misses its TPOT target.
    rng = random.Random(3)
    model = StepTimeModel(forget=1.0, prior_weight=0.01)
    for _ in range(300):
        shape = random_shape(rng)
        model.observe(shape, true_time(shape))
    decode_only = StepShape(7, 0, 7 * 300, 0)
    with_chunk = StepShape(7, 16, 7 * 300, 16 * 616)
    added = model.predict(with_chunk) - model.predict(decode_only)
    assert added == pytest.approx(TRUE[5] + 16 * TRUE[2] + 16 * 616 * TRUE[4], rel=0.05)
    assert added > 2 * 16 * TRUE[2]


def test_without_observations_the_prior_predicts():
    model = StepTimeModel()
    typical = StepShape(16, 256, 16384, 256 * 1024)  # a mixed step
    assert model.predict(typical) == pytest.approx(sum(DEFAULT_PRIOR))
    assert model.coefficients == pytest.approx(tuple(p / s for p, s in zip(DEFAULT_PRIOR, SCALES)))


def test_forgetting_follows_a_machine_that_slows_down():
    rng = random.Random(1)
    model = StepTimeModel(forget=0.98)
    slow = tuple(3 * w for w in TRUE)  # e.g. another tenant took the cores
    for w in (TRUE, slow):
        for _ in range(300):
            shape = random_shape(rng)
            model.observe(shape, true_time(shape, w))
    probe = StepShape(8, 128, 8 * 500, 128 * 128)
    assert model.predict(probe) == pytest.approx(true_time(probe, slow), rel=0.08)  # the prior pulls a little


def test_costs_stay_non_negative():
    model = StepTimeModel(forget=1.0, prior_weight=0.01)
    # Steps that get faster with more decode rows (noise, a cache effect): no negative per-row cost.
    for decodes, seconds in [(1, 0.030), (8, 0.029), (16, 0.028), (32, 0.027)] * 20:
        model.observe(StepShape(decodes, 0, decodes * 100, 0), seconds)
    assert all(c >= 0 for c in model.coefficients)
    assert model.predict(StepShape(64, 0, 6400, 0)) > 0


def test_warm_up_settles_into_the_prior():
    model = StepTimeModel(forget=1.0)
    rng = random.Random(2)
    for _ in range(200):
        shape = random_shape(rng)
        model.observe(shape, true_time(shape))
    fitted = model.coefficients
    model.settle_prior()
    assert model.num_observations == 0
    assert model.coefficients == pytest.approx(fitted)

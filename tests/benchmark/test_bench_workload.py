"""Datasets are deterministic by seed with the lengths asked for; arrivals have the right mean."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kvferry.benchmark.arrivals import arrival_times, parse_rates
from kvferry.benchmark.datasets import WORDS, DatasetSpec, make_samples


def test_synthetic_is_deterministic_with_the_requested_lengths():
    spec = DatasetSpec("synthetic", input_len=100, output_len=20, range_ratio=0.5)
    a = make_samples(spec, 200, seed=7)
    assert a == make_samples(spec, 200, seed=7)
    assert a != make_samples(spec, 200, seed=8) and a != make_samples(spec, 200, seed=7, round_index=1)
    for s in a:
        words = s.prompt.split()
        assert len(words) == s.prompt_words and 50 <= s.prompt_words <= 150 and 10 <= s.output_len <= 20 + 10
        assert set(words) <= set(WORDS)
    assert min(s.prompt_words for s in a) < 60 and max(s.prompt_words for s in a) > 140  # the whole range
    fixed = make_samples(DatasetSpec("synthetic", input_len=64, output_len=16), 5, seed=0)
    assert {(s.prompt_words, s.output_len) for s in fixed} == {(64, 16)}


def test_mixed_preset_is_20_percent_long():
    samples = make_samples(DatasetSpec("mixed"), 50, seed=3)
    long = [s for s in samples if s.prompt_words >= 700]
    assert len(long) == 10 and all(s.prompt_words <= 1400 for s in long)
    assert all(40 <= s.prompt_words <= 200 for s in samples if s not in long)
    assert {s.output_len for s in samples} == {64}
    assert samples == make_samples(DatasetSpec("mixed"), 50, seed=3)


def test_jsonl_and_sharegpt_files(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one two", "output_len": 3}\n\n{"prompt": "three"}\n')
    samples = make_samples(DatasetSpec("jsonl", str(path)), 4, seed=0)
    assert sorted({(s.prompt, s.output_len) for s in samples}) == [("one two", 3), ("three", 128)]
    assert len(samples) == 4  # cycles through a short file
    assert {s.output_len for s in make_samples(DatasetSpec("jsonl", str(path), output_len=9), 2, 0)} == {9}

    share = tmp_path / "sharegpt.json"
    share.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "hello there"},
                                      {"from": "gpt", "value": "one two three four five six"}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "skipped: starts with the model"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "only one turn"}]},
    ]))
    (s,) = make_samples(DatasetSpec("sharegpt", str(share)), 1, seed=0)
    assert (s.prompt, s.output_len, s.prompt_words) == ("hello there", 8, 2)  # 6 words * 4/3 tokens

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "output_len": 0}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        make_samples(DatasetSpec("jsonl", str(bad)), 1, 0)
    with pytest.raises(ValueError, match="--dataset-path"):
        DatasetSpec("sharegpt")


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrivals_have_the_right_mean_and_shape(burstiness):
    rate, n = 2.5, 40_000
    times = arrival_times(rate, n, burstiness, seed=1)
    gaps = np.diff(times)
    assert times[0] == 0.0 and len(times) == n
    # Mean gap 1/rate; a gamma gap's squared coefficient of variation is 1/shape (1 for Poisson).
    # With 40k gaps the standard error of the mean is 0.5-1.4% of it: 5% is > 3.5 sigma.
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1 / burstiness, rel=0.1)
    assert times == arrival_times(rate, n, burstiness, seed=1)
    assert times != arrival_times(rate, n, burstiness, seed=2)


def test_infinite_rate_and_rate_lists():
    assert arrival_times(math.inf, 3, 1.0, 0) == [0.0, 0.0, 0.0]
    assert parse_rates("0.1, 0.2,inf") == [0.1, 0.2, math.inf]
    for bad in ("0", "-1", "fast", ""):
        with pytest.raises(ValueError):
            parse_rates(bad)
    with pytest.raises(ValueError):
        arrival_times(1.0, 3, 0.0, 0)

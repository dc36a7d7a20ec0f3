"""Samplers on hand-made distributions."""

import math

import pytest
import torch

from layerrun.engine.sampling import SamplingParams, apply_top_k, apply_top_p, greedy, make_sampler
from layerrun.errors import LayerRunError


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, -1.0, 4.9]])
    assert greedy(logits).tolist() == [1, 0]
    assert make_sampler(SamplingParams(temperature=0)) is greedy


def test_top_k_keeps_k_best():
    x = apply_top_k(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), 2)
    assert torch.isinf(x[0, [0, 3]]).all() and x[0, 1] == 4.0 and x[0, 2] == 3.0


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    x = apply_top_p(probs.log(), 0.8)
    kept = (~torch.isinf(x)).tolist()[0]
    assert kept == [True, True, False, False]
    x = apply_top_p(probs.log(), 0.81)
    assert (~torch.isinf(x)).tolist()[0] == [True, True, True, False]
    x = apply_top_p(torch.tensor([[0.9, 0.1]]).log(), 0.5)  # always keeps at least one
    assert (~torch.isinf(x)).tolist()[0] == [True, False]


def test_sampling_follows_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    s = make_sampler(SamplingParams(temperature=1.0, seed=0))
    draws = torch.stack([s(probs.log()[None])[0] for _ in range(4000)])
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_temperature_sharpens():
    logits = torch.tensor([[math.log(0.6), math.log(0.4)]])
    s = make_sampler(SamplingParams(temperature=0.1, seed=0))
    draws = [int(s(logits)[0]) for _ in range(500)]
    assert draws.count(0) > 480


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5)])
def test_bad_parameters_rejected(kw):
    with pytest.raises(LayerRunError):
        make_sampler(SamplingParams(**kw))


def test_degenerate_parameters_do_not_crash():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert make_sampler(SamplingParams(temperature=1e-300))(logits).tolist() == [1]  # tiny temperature is greedy
    s = make_sampler(SamplingParams(temperature=1.0, top_p=5e-324, seed=0))  # keeps at least the best token
    assert s(logits).tolist() == [1]

"""Samplers on hand-made distributions."""

import math

import pytest
import torch

from layerrun.engine.sampling import (
    Penalties,
    SamplingParams,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    greedy,
    make_sampler,
)
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


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5), dict(min_p=-0.1),
                                dict(min_p=1.5), dict(repetition_penalty=0), dict(frequency_penalty=2.5),
                                dict(presence_penalty=-3)])
def test_bad_parameters_rejected(kw):
    with pytest.raises(LayerRunError):
        make_sampler(SamplingParams(**kw))


def test_degenerate_parameters_do_not_crash():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert make_sampler(SamplingParams(temperature=1e-300))(logits).tolist() == [1]  # tiny temperature is greedy
    s = make_sampler(SamplingParams(temperature=1.0, top_p=5e-324, seed=0))  # keeps at least the best token
    assert s(logits).tolist() == [1]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = (~torch.isinf(apply_min_p(probs.log(), 0.2))).tolist()[0]
    assert kept == [True, True, True, False]  # 0.05 < 0.2 * 0.5
    kept = (~torch.isinf(apply_min_p(probs.log(), 0.7))).tolist()[0]
    assert kept == [True, False, False, False]
    assert torch.equal(apply_min_p(probs.log(), 0.0), probs.log())
    # a seeded sampler with min_p never draws a dropped token
    s = make_sampler(SamplingParams(temperature=1.0, min_p=0.5, seed=0))
    assert set(int(s(probs.log())[0]) for _ in range(300)) == {0, 1}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -1.0, 3.0, 0.5])
    out = apply_penalties(logits, prompt_ids=[0], output_ids=[1], repetition=2.0)
    assert out.tolist() == [1.0, -2.0, 3.0, 0.5]  # prompt and output tokens both count; others untouched


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.zeros(4)
    out = apply_penalties(logits, prompt_ids=[3, 3], output_ids=[1, 1, 2], frequency=0.5, presence=1.0)
    assert out.tolist() == [0.0, -2.0, -1.5, 0.0]  # 1: 2*0.5+1; 2: 0.5+1; 3 only in the prompt
    assert apply_penalties(logits, [], [], frequency=0.5).tolist() == [0.0] * 4


def test_penalties_processor_splits_history_at_the_prompt():
    p = Penalties(SamplingParams(presence_penalty=1.0), prompt_len=2)
    out = p([0, 1, 1, 2], torch.zeros(3))
    assert out.tolist() == [0.0, -1.0, -1.0]  # token 0 is only in the prompt
    assert SamplingParams(repetition_penalty=1.1).penalized and not SamplingParams().penalized

"""Sampling filters on hand-made distributions, and seeded reproducibility (retention.sampling)."""
import numpy as np
import pytest

from retention.sampling import (Sampler, SamplingParams, apply_repetition_penalty,
                                filtered_logits, min_p_filter, sample_tokens, softmax,
                                top_k_filter, top_p_filter)

# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 over a 5-token vocabulary, in shuffled order.
PROBS = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
LOGITS = np.log(PROBS)[None, :]


def kept(logits_BV):
    return set(np.flatnonzero(np.isfinite(logits_BV[0])).tolist())


def test_top_k_keeps_the_k_most_likely():
    assert kept(top_k_filter(LOGITS, 1)) == {1}
    assert kept(top_k_filter(LOGITS, 3)) == {1, 3, 4}
    assert kept(top_k_filter(LOGITS, 0)) == {0, 1, 2, 3, 4}     # 0 = off
    assert kept(top_k_filter(LOGITS, 99)) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    assert kept(top_p_filter(LOGITS, 0.4)) == {1}               # 0.4 alone reaches 0.4
    assert kept(top_p_filter(LOGITS, 0.41)) == {1, 3}           # needs 0.4 + 0.3
    assert kept(top_p_filter(LOGITS, 0.8)) == {1, 3, 4}         # 0.85 >= 0.8
    assert kept(top_p_filter(LOGITS, 0.86)) == {1, 3, 4, 0}
    assert kept(top_p_filter(LOGITS, 0.01)) == {1}              # the top token always stays
    assert kept(top_p_filter(LOGITS, 1.0)) == {0, 1, 2, 3, 4}


def test_top_p_renormalises_over_the_nucleus():
    probs = softmax(top_p_filter(LOGITS, 0.7))
    np.testing.assert_allclose(probs[0], [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], atol=1e-12)


def test_min_p_keeps_tokens_above_a_fraction_of_the_top():
    assert kept(min_p_filter(LOGITS, 0.5)) == {1, 3}            # >= 0.2
    assert kept(min_p_filter(LOGITS, 0.25)) == {1, 3, 4, 0}     # >= 0.1
    assert kept(min_p_filter(LOGITS, 0.0)) == {0, 1, 2, 3, 4}
    assert kept(min_p_filter(LOGITS, 0.99)) == {1}


def test_repetition_penalty_lowers_seen_tokens_whatever_their_sign():
    logits = np.array([[2.0, -1.0, 0.5, 3.0]])
    seen = np.array([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, 3.0]])
    # Greedy flips away from a seen favourite once the penalty is large enough.
    logits = np.array([[3.0, 2.0]])
    seen = np.array([[True, False]])
    assert sample_tokens(logits, SamplingParams(temperature=0), None, seen)[0] == 0
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample_tokens(logits, params, None, seen)[0] == 1


def test_sampler_penalises_prompt_and_its_own_tokens():
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=10.0), 3, 1)
    logits = np.array([[3.0, 2.0, 1.0]])
    sampler.observe([0], [0])                                   # token 0 was in the prompt
    assert [int(sampler(logits, [0])[0]) for _ in range(3)] == [1, 2, 0]


def test_temperature_zero_is_greedy_and_temperature_sharpens():
    logits = np.log(np.array([[0.2, 0.5, 0.3]]))
    assert sample_tokens(logits, SamplingParams(temperature=0), None)[0] == 1
    hot = softmax(filtered_logits(logits, SamplingParams(temperature=2.0)))
    cold = softmax(filtered_logits(logits, SamplingParams(temperature=0.5)))
    assert cold[0, 1] > 0.5 > hot[0, 1]


def test_draws_follow_the_filtered_distribution():
    params = SamplingParams(temperature=1.0, top_k=3)
    rng = np.random.default_rng(0)
    draws = sample_tokens(np.repeat(LOGITS, 20000, axis=0), params, rng)
    freq = np.bincount(draws, minlength=5) / draws.size
    np.testing.assert_allclose(freq, [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85], atol=0.015)


def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(1).normal(size=(4, 1000))
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, min_p=0.01,
                            repetition_penalty=1.3)

    def run(seed):
        sampler = Sampler(params, 1000, 4, seed)
        return np.stack([sampler(logits, [0, 1, 2, 3]) for _ in range(20)])

    np.testing.assert_array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                    dict(top_k=-1), dict(top_k=1.5), dict(min_p=1.0),
                                    dict(repetition_penalty=0)])
def test_bad_parameters_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_top_p_partial_sort_matches_a_full_sort():
    def full_sort_top_p(logits, p):
        probs = softmax(logits)[0]
        order = np.lexsort((np.arange(probs.size), -probs))
        before = np.cumsum(probs[order]) - probs[order]
        return set(order[before < p].tolist())

    rng = np.random.default_rng(0)
    for sharpness in (0.5, 3.0, 8.0):          # flat (full sort) to peaked (partial sort)
        logits = rng.normal(size=(1, 5000)) * sharpness
        for p in (0.1, 0.5, 0.9, 0.99):
            assert kept(top_p_filter(logits, p)) == full_sort_top_p(logits, p)


def test_top_p_ties_larger_than_the_partial_sort_keep_the_lowest_ids():
    # 2000 equal logits: the nucleus of 0.3 is tokens 0..599, as the docstring promises,
    # even though the partial sort looks at only 1024 of the tied tokens.
    logits = np.zeros((1, 2000))
    assert kept(top_p_filter(logits, 0.3)) == set(range(600))
    logits = np.concatenate([[[5.0]], np.zeros((1, 3000))], axis=1)   # a top token + ties
    probs = softmax(logits)[0]
    n_ties = int(np.ceil((0.6 - probs[0]) / probs[1] - 1e-9))
    assert kept(top_p_filter(logits, 0.6)) == set(range(n_ties + 1))

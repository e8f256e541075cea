"""Rollout generation (batched KV-cache sampling), sequence packing and reward functions."""

import mlx.core as mx
import numpy as np
import pytest

from lazarus.data import PromptDataset
from lazarus.training import RewardError, RewardFunctions, exact_match, generate_completions
from lazarus.training.base import token_logps
from lazarus.training.online_rl import pack_sequences


def _prompts(tok, examples, n=6):
    ds = PromptDataset(examples / "prompts_train.jsonl", tok)
    ids = [ds.examples[i].ids for i in range(n)]
    return ids + [ids[0][-3:]]  # a much shorter prompt: rows get different left padding


def test_completions_keep_ids_that_decode_to_text_and_their_logprobs(tiny, examples):
    model, tok = tiny
    prompts = _prompts(tok, examples)
    mx.random.seed(3)
    comps = generate_completions(model, tok, prompts, max_tokens=12, temperature=1.0)
    eos = tok.eos_token_id
    assert len(comps) == len(prompts) and comps.prompt_ids == prompts
    for ids, lps, fin, text in zip(comps.completion_ids, comps.logprobs, comps.finished, comps.texts):
        assert 1 <= len(ids) <= 12 and len(lps) == len(ids)
        assert fin == (ids[-1] == eos) and eos not in ids[:-1]
        assert tok.decode(ids[:-1] if fin else ids) == text
        assert all(lp <= 0 for lp in lps)
    m = comps.metrics()
    assert m["completions/mean_length"] == pytest.approx(np.mean([len(c) for c in comps.completion_ids]))
    assert m["completions/clipped_ratio"] == pytest.approx(1 - np.mean(comps.finished))

    # sampling log-probs == the training forward's log-probs of the same ids (no re-tokenizing)
    inputs, targets, mask = pack_sequences(comps.prompt_ids, comps.completion_ids, pad_id=0)
    lp = np.array(token_logps(model, mx.array(inputs), mx.array(targets)))
    for i, (p, c) in enumerate(zip(comps.prompt_ids, comps.completion_ids)):
        s = len(p) - 1
        assert mask[i].sum() == len(c) and mask[i, s] == 1 and (s == 0 or mask[i, s - 1] == 0)
        np.testing.assert_array_equal(targets[i, s: s + len(c)], c)
        np.testing.assert_allclose(lp[i, s: s + len(c)], comps.logprobs[i], atol=1e-4)


def test_sampling_is_reproducible_and_batching_matches_single_rows(tiny, examples):
    model, tok = tiny
    prompts = _prompts(tok, examples)
    mx.random.seed(7)
    a = generate_completions(model, tok, prompts, max_tokens=10, temperature=1.0)
    mx.random.seed(7)
    b = generate_completions(model, tok, prompts, max_tokens=10, temperature=1.0)
    assert a.completion_ids == b.completion_ids
    greedy = generate_completions(model, tok, prompts, max_tokens=10, temperature=0.0)
    for i in (0, len(prompts) - 1):  # left padding must not change what a row generates
        alone = generate_completions(model, tok, [prompts[i]], max_tokens=10, temperature=0.0)
        assert alone.completion_ids[0] == greedy.completion_ids[i]
    # a tiny top_p keeps only the most likely token: sampling becomes greedy
    nucleus = generate_completions(model, tok, prompts, max_tokens=10, temperature=1.0, top_p=1e-6)
    assert nucleus.completion_ids == greedy.completion_ids


def test_pack_sequences_layout():
    inputs, targets, mask = pack_sequences([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0, pad_multiple=8)
    assert inputs.shape == (2, 8)
    np.testing.assert_array_equal(inputs[0, :4], [5, 6, 7, 1])
    np.testing.assert_array_equal(targets[0, :4], [6, 7, 1, 2])
    np.testing.assert_array_equal(mask[0], [0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(targets[1, :3], [3, 4, 9])
    np.testing.assert_array_equal(mask[1], [1, 1, 1, 0, 0, 0, 0, 0])


def test_reward_functions_weights_columns_and_none():
    def length(prompts, completions, **cols):
        return [len(c) for c in completions]

    def maybe(prompts, completions, **cols):
        return [None if c == "" else 1.0 for c in completions]

    rf = RewardFunctions([length, exact_match(), maybe], weights=[0.5, 2.0, 1.0])
    total, per = rf(["p", "q", "r"], ["12", "x", ""], {"answer": ["12", "3", "4"]})
    assert rf.names == ["length", "exact_match_answer", "maybe"]
    np.testing.assert_allclose(per["length"], [2, 1, 0])
    np.testing.assert_allclose(per["exact_match_answer"], [1, 0, 0])
    assert np.isnan(per["maybe"][2])
    np.testing.assert_allclose(total, [0.5 * 2 + 2 + 1, 0.5 + 1, 0.0])
    # two functions of the same name are told apart
    assert RewardFunctions([length, length]).names == ["length", "length_2"]


def test_reward_function_errors_name_the_function():
    def broken(prompts, completions, **cols):
        raise ZeroDivisionError("oops")

    def short(prompts, completions, **cols):
        return [1.0]

    def texty(prompts, completions, **cols):
        return ["good"] * len(completions)

    for fn, words in [(broken, ["'broken'", "ZeroDivisionError", "oops"]), (short, ["'short'", "1 rewards", "2"]),
                      (texty, ["'texty'", "non-number"])]:
        with pytest.raises(RewardError) as e:
            RewardFunctions(fn)(["a", "b"], ["x", "y"], {})
        for w in words:
            assert w in str(e.value)
    with pytest.raises(RewardError, match="'exact_match_answer'.*KeyError"):
        RewardFunctions(exact_match())(["a"], ["x"], {"solution": ["x"]})
    with pytest.raises(ValueError, match="reward_weights has 1"):
        RewardFunctions([broken, short], weights=[1.0])
    with pytest.raises(ValueError, match="at least one reward function"):
        RewardFunctions([])


def test_models_whose_cache_cannot_be_batched_generate_row_by_row(tiny, examples, monkeypatch):
    from lazarus.training import generation

    model, tok = tiny
    prompts = _prompts(tok, examples, n=3)
    batched = generate_completions(model, tok, prompts, max_tokens=8, temperature=0.0)
    monkeypatch.setattr(generation, "_batch_cache", lambda model, left_padding: None)
    rows = generate_completions(model, tok, prompts, max_tokens=8, temperature=0.0)
    assert rows.completion_ids == batched.completion_ids and rows.texts == batched.texts
    np.testing.assert_allclose(np.concatenate(rows.logprobs), np.concatenate(batched.logprobs), atol=1e-4)


def test_explicit_key_gives_its_own_reproducible_stream(tiny, examples):
    model, tok = tiny
    prompts = _prompts(tok, examples, n=4)
    state = mx.random.state[0]
    a = generate_completions(model, tok, prompts, max_tokens=8, key=mx.random.key(1))
    b = generate_completions(model, tok, prompts, max_tokens=8, key=mx.random.key(1))
    c = generate_completions(model, tok, prompts, max_tokens=8, key=mx.random.key(2))
    assert a.completion_ids == b.completion_ids != c.completion_ids
    assert mx.array_equal(mx.random.state[0], state).item()  # the global stream was not used

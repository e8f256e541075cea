"""Datasets and batching: masks, chat template, bucketing, strict input, deterministic order."""

import json
import warnings

import numpy as np
import pytest

from conftest import write_jsonl
from lazarus.data import DataError, DataLoader, PreferenceDataset, PromptDataset, SFTDataset


def enc(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


def test_sft_masks_on_known_token_ids(tiny, tmp_path):
    _, tok = tiny
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is 1+2?", "response": "3"},
                                           {"prompt": "What is 10+10?", "response": "20 twenty"}])
    ds = SFTDataset(f, tok)
    prompt_ids = enc(tok, tok.apply_chat_template([{"role": "user", "content": "What is 1+2?"}],
                                                  add_generation_prompt=True, tokenize=False))
    resp_ids = enc(tok, "3") + [tok.eos_token_id]
    assert ds.examples[0].ids == prompt_ids + resp_ids
    b = ds.collate([0, 1])
    inputs, targets, mask = (np.array(b[k]) for k in ("inputs", "targets", "mask"))
    assert inputs.shape[1] % 8 == 0
    row = ds.examples[0].ids
    n = len(row) - 1
    np.testing.assert_array_equal(inputs[0, :n], row[:-1])
    np.testing.assert_array_equal(targets[0, :n], row[1:])
    # targets under the mask are exactly the response tokens, EOS included
    assert targets[0][mask[0] == 1].tolist() == resp_ids
    assert targets[0][mask[0] == 1][-1] == tok.eos_token_id
    # no padding position is ever a target
    assert mask[0, n:].sum() == 0
    assert b["num_tokens"] == int(mask.sum()) == float(b["loss_weight"].item())
    # mask_prompt=False: every real target counts, padding still never does
    ds2 = SFTDataset(f, tok, mask_prompt=False)
    m2 = np.array(ds2.collate([0, 1])["mask"])
    assert m2[0, :n].sum() == n and m2[0, n:].sum() == 0


def test_chat_template_applied_and_optional(tiny, tmp_path):
    _, tok = tiny
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hello", "response": "world"}])
    with_t = SFTDataset(f, tok)
    without = SFTDataset(f, tok, use_chat_template=False)
    assert tok.decode(with_t.examples[0].ids[: with_t.examples[0].prompt_len]) == "<|user|>hello<|end|><|assistant|>"
    assert tok.decode(without.examples[0].ids[: without.examples[0].prompt_len]) == "hello"


def test_messages_format(tiny, tmp_path):
    _, tok = tiny
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "system", "content": "be brief"},
                                                         {"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "yes"}]}])
    ex = SFTDataset(f, tok).examples[0]
    assert tok.decode(ex.ids[: ex.prompt_len]) == "<|system|>be brief<|end|><|user|>hi<|end|><|assistant|>"
    assert ex.ids[ex.prompt_len:] == enc(tok, "yes") + [tok.eos_token_id]


def test_preference_collate_chosen_then_rejected(tiny, tmp_path):
    _, tok = tiny
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q1", "chosen": "good", "rejected": "bad answer"},
                                           {"prompt": "q2", "chosen": "7", "rejected": "8"}])
    ds = PreferenceDataset(f, tok)
    b = ds.collate([0, 1])
    t, m = np.array(b["targets"]), np.array(b["mask"])
    assert t.shape[0] == 4
    assert t[0][m[0] == 1].tolist() == enc(tok, "good") + [tok.eos_token_id]
    assert t[2][m[2] == 1].tolist() == enc(tok, "bad answer") + [tok.eos_token_id]
    assert t[3][m[3] == 1].tolist() == enc(tok, "8") + [tok.eos_token_id]


def test_prompt_dataset_keeps_extra_columns(tiny, tmp_path):
    _, tok = tiny
    f = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "What is 1+1?", "answer": "2", "level": 1},
                                           {"prompt": "What is 2+2?", "answer": "4", "level": 2}])
    ds = PromptDataset(f, tok)
    b = ds.collate([1, 0])
    assert b["prompts"] == ["What is 2+2?", "What is 1+1?"]
    assert b["columns"] == {"answer": ["4", "2"], "level": [2, 1]}


@pytest.mark.parametrize("content,line,field,message", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', 2, None, "malformed JSON"),
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n', 3, "response", "missing"),
    ('{"prompt": 3, "response": "b"}\n', 1, "prompt", "must be a string, got int"),
    ('["prompt", "response"]\n', 1, None, "expected a JSON object"),
    ('', None, None, "file is empty"),
])
def test_bad_input_names_file_line_field(tiny, tmp_path, content, line, field, message):
    _, tok = tiny
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        SFTDataset(f, tok)
    err = e.value
    assert isinstance(err, ValueError)
    assert err.file == str(f) and err.line == line and err.field == field
    assert message in str(err) and str(f) in str(err)
    if line:
        assert f"{f}:{line}:" in str(err)
    if field:
        assert f"'{field}'" in str(err)


def test_missing_and_unknown_files(tiny, tmp_path):
    _, tok = tiny
    with pytest.raises(DataError, match="file not found"):
        SFTDataset(tmp_path / "nope.jsonl", tok)
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,response\na,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        SFTDataset(csv, tok)


def test_all_bad_lines_counted_before_training(tiny, tmp_path):
    _, tok = tiny
    rows = [json.dumps({"prompt": "a", "response": "b"})] * 3 + ["{oops", json.dumps({"prompt": "a"}), "[1]"]
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:4: malformed JSON.*and 1 more bad line"):
        SFTDataset(f, tok)


def test_prompt_exceeding_max_length_is_an_error_and_truncation_counted(tiny, tmp_path):
    _, tok = tiny
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b " * 30},
                                           {"prompt": "a long prompt " * 10, "response": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'prompt': prompt alone is \d+ tokens"):
        SFTDataset(f, tok, max_length=16)
    f2 = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "response": "b " * 30}, {"prompt": "a", "response": "b"}])
    with pytest.warns(UserWarning, match="1 examples truncated and 0 dropped"):
        ds = SFTDataset(f2, tok, max_length=16)
    assert len(ds.examples[0].ids) == 16 and ds.num_truncated == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dropped = SFTDataset(f2, tok, max_length=16, truncation="drop")
    assert len(dropped) == 1 and dropped.num_dropped == 1


class Lengths:
    """A dataset of given lengths (bucketing maths only)."""

    def __init__(self, lengths):
        self._l = np.array(lengths)

    def __len__(self):
        return len(self._l)

    def lengths(self):
        return self._l

    def collate(self, indices, pad_multiple=8):
        return {"indices": indices}


def test_bucketing_wastes_less_padding_than_random_batches():
    rng = np.random.default_rng(0)
    ds = Lengths(rng.integers(10, 400, size=512))
    bucketed = DataLoader(ds, 8, seed=1, bucket=True).padding_fraction(0)
    plain = DataLoader(ds, 8, seed=1, bucket=False).padding_fraction(0)
    assert bucketed < 0.1 < plain
    assert bucketed < plain / 3


def test_order_deterministic_from_seed_and_covers_every_example():
    ds = Lengths(np.arange(1, 101))
    a, b, c = DataLoader(ds, 8, seed=3), DataLoader(ds, 8, seed=3), DataLoader(ds, 8, seed=4)
    order = lambda dl, e: [dl.batch_indices(e, i) for i in range(len(dl))]  # noqa: E731
    assert order(a, 0) == order(b, 0)
    assert order(a, 0) != order(c, 0)
    assert order(a, 0) != order(a, 1)
    assert sorted(i for batch in order(a, 1) for i in batch) == list(range(100))


def test_global_batch_split_across_ranks():
    ds = Lengths(np.arange(1, 41))
    full = DataLoader(ds, 8, seed=0)
    r0, r1 = DataLoader(ds, 8, seed=0), DataLoader(ds, 8, seed=0)
    r0.set_distributed(0, 2)
    r1.set_distributed(1, 2)
    for i in range(len(full)):
        assert r0.batch_indices(0, i) + r1.batch_indices(0, i) == full.batch_indices(0, i)
    with pytest.raises(ValueError, match="batch_size=8 is the global batch and must be divisible"):
        DataLoader(ds, 8).set_distributed(0, 3)

"""Data as users have it: every format and source loads and trains, multi-turn masks token by token
against the chat template, implicit prompts, and a one-line error for every malformed case."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest

from conftest import EXAMPLES, write_jsonl
from lazarus.data import DataError, PreferenceDataset, PromptDataset, SFTDataset, UnpairedDataset
from lazarus.training import (DPOConfig, DPOTrainer, DPOTrainerConfig, GRPOConfig, GRPOTrainer, SFTConfig,
                              SFTTrainer)
from test_chat_templates import FAMILIES, make_family

ROWS = [{"prompt": "What is 2+3?", "response": "5"}, {"prompt": "What is 1+1?", "response": "2"},
        {"prompt": "What is 4+4?", "response": "8"}, {"prompt": "What is 3+3?", "response": "6"}]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": "Let me add."}, {"role": "tool", "content": "5"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 3+4?"},
                {"role": "assistant", "content": "7"}]
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>tools:{% for t in tools %} {{ t['name'] }}{% endfor %}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] or '' }}"
    "{% for c in (m.tool_calls or []) %}call {{ c['name'] }}{% endfor %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def enc(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


def render(tok, msgs, gen):
    return tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)


def trained(ds, i=0):
    """(trained target ids, their positions) of example ``i``."""
    b = ds.collate([i])
    t, m = np.array(b["targets"][0]), np.array(b["mask"][0])
    return t[m > 0].tolist(), np.flatnonzero(m).tolist()


def short(cls=SFTConfig, tmp_path=None, **kw):
    return cls(max_steps=2, batch_size=2, warmup_steps=0, checkpoint_interval=None, log_interval=1,
               checkpoint_dir=str(tmp_path / "ckpt") if tmp_path else "checkpoints", **kw)


def one_line(exc_info, *parts):
    text = str(exc_info.value)
    assert "\n" not in text, text
    for p in parts:
        assert p in text, f"{p!r} not in {text!r}"
    return text


@pytest.fixture(scope="module")
def family(tiny_dir, tmp_path_factory):
    """name -> tokenizer: the tiny model's, the families of test_chat_templates, and one rendering tools."""
    from lazarus.models import load_model

    root = tmp_path_factory.mktemp("formats_families")
    toks = {"tiny": load_model(tiny_dir)[1]}
    for name in ("chatml", "llama3", "gemma", "mistral", "reasoning"):
        toks[name] = load_model(make_family(tiny_dir, root / name, name))[1]
    tools = make_family(tiny_dir, root / "tools", "chatml")  # any copy; its template is replaced
    cfg = json.loads((tools / "tokenizer_config.json").read_text())
    cfg.update(chat_template=TOOLS_TEMPLATE, eos_token="<|end|>")
    (tools / "tokenizer_config.json").write_text(json.dumps(cfg))
    toks["tools"] = load_model(tools)[1]
    return toks


def end_token(tok, name):
    return tok.convert_tokens_to_ids("<|end|>" if name in ("tiny", "tools") else FAMILIES[name][6])


# ================================================================== SFT formats
def test_prompt_completion_is_prompt_response_and_conversational_form_matches(tiny, tmp_path):
    _, tok = tiny
    base = SFTDataset(ROWS, tok)
    completion = SFTDataset([{"prompt": r["prompt"], "completion": r["response"]} for r in ROWS], tok)
    conversational = SFTDataset([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "completion": [{"role": "assistant", "content": r["response"]}]} for r in ROWS], tok)
    assert base.row_format.name == "prompt_response" and completion.row_format.name == "prompt_completion"
    assert base.fingerprint() == completion.fingerprint() == conversational.fingerprint()
    e = base.examples[0]
    assert e.ids[: e.prompt_len] == enc(tok, render(tok, [{"role": "user", "content": "What is 2+3?"}], True))
    assert trained(base)[0] == enc(tok, "5") + [tok.eos_token_id]
    # a system message in a conversational prompt is the prompt's
    sys_row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
               "completion": [{"role": "assistant", "content": "Hello"}]}
    e = SFTDataset([sys_row], tok).examples[0]
    assert tok.decode(e.ids[: e.prompt_len]) == "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"
    result = SFTTrainer(*tiny, short(tmp_path=tmp_path)).train([{"prompt": r["prompt"], "completion": r["response"]}
                                                                for r in ROWS])
    assert result.stop_reason == "max_steps reached (2)"


def test_text_trains_every_token(tiny, tmp_path):
    _, tok = tiny
    ds = SFTDataset([{"text": "What is 2+3? 5"}, {"text": "1+1=2"}], tok)
    e = ds.examples[0]
    assert e.ids == list(tok.encode("What is 2+3? 5", add_special_tokens=True)) + [tok.eos_token_id]
    targets, positions = trained(ds)
    assert targets == e.ids[1:] and positions == list(range(len(e.ids) - 1))
    result = SFTTrainer(*tiny, short(tmp_path=tmp_path)).train([{"text": f"{a}+{a}={2 * a}"} for a in range(6)])
    assert result.stop_reason == "max_steps reached (2)" and np.isfinite(result.history[-1]["loss"])


@pytest.mark.parametrize("name", ["tiny", "chatml", "llama3", "gemma", "mistral"])
def test_every_assistant_turn_trained_token_by_token(name, family):
    """The ids are the template's rendering of the whole conversation (cut after its last end token);
    exactly the assistant turns' tokens (each with its one end token) are trained, nothing else."""
    tok = family[name]
    end = end_token(tok, name)
    ds = SFTDataset([{"messages": CONVERSATION}], tok)
    e = ds.examples[0]
    whole = render(tok, CONVERSATION, False)
    end_text = tok.convert_ids_to_tokens(end)
    assert e.ids == enc(tok, whole[: whole.rindex(end_text) + len(end_text)])
    expected = []
    for k, m in enumerate(CONVERSATION):
        if m["role"] == "assistant":  # its tokens start where the rendering before it, with the generation prompt, ends
            start = len(enc(tok, render(tok, CONVERSATION[:k], True)))
            assert e.ids[:start] == enc(tok, render(tok, CONVERSATION[:k], True))
            reply = enc(tok, m["content"]) + [end]
            assert e.ids[start: start + len(reply)] == reply
            expected += list(range(start - 1, start - 1 + len(reply)))
    targets, positions = trained(ds)
    assert positions == expected
    assert targets == enc(tok, "Let me add.") + [end] + enc(tok, "5") + [end] + enc(tok, "7") + [end]


def test_assistant_only_false_and_mask_prompt_false_train_every_token(family):
    tok = family["chatml"]
    for ds in (SFTDataset([{"messages": CONVERSATION}], tok, assistant_only=False),
               SFTDataset([{"messages": CONVERSATION}], tok, mask_prompt=False)):
        e = ds.examples[0]
        assert trained(ds)[1] == list(range(len(e.ids) - 1))
    assert SFTDataset([{"messages": CONVERSATION}], tok, assistant_only=False).examples[0].ids == \
        SFTDataset([{"messages": CONVERSATION}], tok).examples[0].ids


def test_tools_column_and_tool_calls_reach_the_template(family):
    tok = family["tools"]
    row = {"messages": [{"role": "user", "content": "What is 2+3?"},
                        {"role": "assistant", "content": None, "tool_calls": [{"name": "add"}]},
                        {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5"}],
           "tools": [{"name": "add"}]}
    ds = SFTDataset([row], tok)
    assert tok.decode(ds.examples[0].ids).startswith("<|system|>tools: add<|end|><|user|>")
    end = end_token(tok, "tools")
    assert trained(ds)[0] == enc(tok, "call add") + [end] + enc(tok, "5") + [end]


def test_inconsistent_template_or_none_trains_the_last_turn_with_a_warning(family, tiny):
    msgs = CONVERSATION[:5]
    tok = family["reasoning"]  # its generation prompt opens <think>, which rendered replies lack
    with pytest.warns(UserWarning, match=r"list: 1 conversations with several assistant turns train only their "
                                         r"last one: the chat template does not render them prefix by prefix"):
        ds = SFTDataset([{"messages": msgs}], tok)
    single = SFTDataset([{"prompt": msgs[:-1], "completion": msgs[-1:]}], tok)
    assert ds.examples[0].ids == single.examples[0].ids and trained(ds)[0] == trained(single)[0]
    with pytest.warns(UserWarning, match="there is no chat template; first: list row 0"):
        SFTDataset([{"messages": msgs}], tiny[1], use_chat_template=False)


def old_fingerprint(examples, names):
    """The resume fingerprint as it was before multi-turn spans existed."""
    h = hashlib.sha256()
    for e in examples:
        for name in names:
            v = getattr(e, name)
            if isinstance(v, list) and (not v or isinstance(v[0], int)):
                h.update(b"L%d:" % len(v) + np.asarray(v, dtype=np.int64).tobytes())
            else:
                h.update(json.dumps(v, sort_keys=True, default=str).encode() + b"\x00")
    return h.hexdigest()


def test_fingerprint_unchanged_for_data_in_an_unchanged_format(tiny):
    _, tok = tiny
    sft = SFTDataset(EXAMPLES / "sft_train.jsonl", tok)
    assert sft.fingerprint() == old_fingerprint(sft.examples, ["ids", "prompt_len"])
    single = SFTDataset([{"messages": CONVERSATION[:3]}], tok)
    assert single.examples[0].spans is None
    assert single.fingerprint() == old_fingerprint(single.examples, ["ids", "prompt_len"])
    prefs = PreferenceDataset(EXAMPLES / "preferences.jsonl", tok)
    assert prefs.fingerprint() == old_fingerprint(prefs.examples, ["prompt", "chosen", "rejected"])
    kto = UnpairedDataset(EXAMPLES / "kto.jsonl", tok)
    assert kto.fingerprint() == old_fingerprint(kto.examples, ["ids", "prompt_len", "label"])


def test_format_from_a_trainer_config(tiny, tmp_path):
    class Config(SFTConfig):  # what a `format`/`assistant_only` config field gives the trainer
        format: str | None = None
        assistant_only: bool = True

    trainer = SFTTrainer(*tiny, short(Config, tmp_path, format="messages", assistant_only=False))
    ds = trainer.as_dataset([{"messages": CONVERSATION}] * 2)
    assert ds.row_format.name == "messages" and not ds.assistant_only
    assert trainer.train([{"messages": CONVERSATION}] * 4).stop_reason == "max_steps reached (2)"


# ================================================================== preferences
def test_conversational_preferences_match_the_text_form(tiny):
    _, tok = tiny
    text = PreferenceDataset([{"prompt": "What is 2+3?", "chosen": "5", "rejected": "six"}], tok)
    conv = PreferenceDataset([{"prompt": [{"role": "user", "content": "What is 2+3?"}],
                               "chosen": [{"role": "assistant", "content": "5"}],
                               "rejected": [{"role": "assistant", "content": "six"}]}], tok)
    assert conv.fingerprint() == text.fingerprint()


def test_implicit_prompt_is_the_shared_start(family, tmp_path):
    tok = family["chatml"]
    end = end_token(tok, "chatml")
    history = CONVERSATION[:2]
    ds = PreferenceDataset([{"chosen": history + [{"role": "assistant", "content": "5"}],
                             "rejected": history + [{"role": "assistant", "content": "six"}]}], tok)
    assert ds.row_format.name == "implicit_preference"
    e = ds.examples[0]
    assert e.prompt == enc(tok, render(tok, history, True))
    assert e.chosen == enc(tok, "5") + [end] and e.rejected == enc(tok, "six") + [end]
    # a multi-turn shared start: earlier turns are prompt
    longer = CONVERSATION[:6]
    e = PreferenceDataset([{"chosen": longer + [{"role": "assistant", "content": "7"}],
                            "rejected": longer + [{"role": "assistant", "content": "8"}]}], tok).examples[0]
    assert e.prompt == enc(tok, render(tok, longer, True)) and e.chosen == enc(tok, "7") + [end]
    # texts: the shared words are the prompt
    implicit = PreferenceDataset([{"chosen": "The sky is blue.", "rejected": "The sky is bleak."}], tok)
    explicit = PreferenceDataset([{"prompt": "The sky is", "chosen": "blue.", "rejected": "bleak."}], tok)
    assert implicit.fingerprint() == explicit.fingerprint()


def test_dpo_trains_on_conversational_pairs(tiny, tmp_path):
    model, tok = tiny
    pairs = [{"chosen": [{"role": "user", "content": f"What is {a}+{a}?"}, {"role": "assistant", "content": str(2 * a)}],
              "rejected": [{"role": "user", "content": f"What is {a}+{a}?"}, {"role": "assistant", "content": "no"}]}
             for a in range(4)]
    config = DPOTrainerConfig(dpo=DPOConfig(beta=0.1), **short(tmp_path=tmp_path).model_dump(
        include={"max_steps", "batch_size", "warmup_steps", "checkpoint_interval", "log_interval", "checkpoint_dir"}))
    result = DPOTrainer(model, None, tok, config).train(pairs)
    assert result.stop_reason == "max_steps reached (2)"


# ================================================================== prompts
def test_message_prompts_and_columns_reach_the_reward_function(tiny, tmp_path):
    model, tok = tiny
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
    rows = [{"prompt": msgs, "answer": "5", "level": 1}, {"prompt": "What is 1+1?", "answer": "2", "level": 2}]
    ds = PromptDataset(rows, tok)
    assert ds.examples[0].ids == enc(tok, render(tok, msgs, True))
    seen = []

    def reward(prompts, completions, **columns):
        seen.append((prompts, columns))
        return [0.0] * len(completions)

    config = GRPOConfig(group_size=2, max_completion_length=4, **short(tmp_path=tmp_path).model_dump(
        include={"batch_size", "warmup_steps", "checkpoint_interval", "log_interval", "checkpoint_dir"}), max_steps=1)
    GRPOTrainer(model, tok, config, reward_fn=reward).train(rows)
    prompts, columns = seen[0]
    assert sorted(columns) == ["answer", "level"] and len(prompts) == 4
    assert msgs in prompts and "What is 1+1?" in prompts  # each prompt as given: messages or text
    assert sorted(columns["answer"]) == ["2", "2", "5", "5"] and sorted(columns["level"]) == [1, 1, 2, 2]


# ================================================================== sources
class FakeDataset:
    """Quacks like ``datasets.Dataset`` (rows as dicts); its module says it is one."""

    def __init__(self, rows):
        self._rows = rows
        self.column_names = sorted(rows[0])

    def __len__(self):
        return len(self._rows)

    def __iter__(self):
        return iter(dict(r) for r in self._rows)


class FakeDatasetDict(dict):
    pass


FakeDataset.__module__ = "datasets.arrow_dataset"
FakeDatasetDict.__module__ = "datasets.dataset_dict"


def sources(tmp_path, rows):
    """The same rows from every source."""
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    files = {"d.jsonl": lines, "pretty.json": json.dumps(rows, indent=2), "compact.json": json.dumps(rows),
             "lines.json": lines, "mlx/train.jsonl": lines}
    (tmp_path / "mlx").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return {**{name: tmp_path / name for name in files}, "folder": tmp_path / "mlx", "str": str(tmp_path / "d.jsonl"),
            "list": rows, "tuple": tuple(rows), "datasets.Dataset": FakeDataset(rows),
            "DatasetDict": FakeDatasetDict(train=FakeDataset(rows))}


def test_every_source_gives_the_same_examples_and_trains(tiny, tmp_path):
    _, tok = tiny
    want = SFTDataset(ROWS, tok).fingerprint()
    src = sources(tmp_path, ROWS)
    src["table rows"] = FakeDataset([dict(r, messages=None, text=None) for r in ROWS])  # null where a row has none
    for name, data in src.items():
        assert SFTDataset(data, tok).fingerprint() == want, name
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": "no"} for r in ROWS]
    assert PreferenceDataset(FakeDataset(pairs), tok).fingerprint() == PreferenceDataset(pairs, tok).fingerprint()
    kto = [{"prompt": r["prompt"], "completion": r["response"], "label": i % 2 == 0} for i, r in enumerate(ROWS)]
    assert len(UnpairedDataset(FakeDataset(kto), tok)) == 4
    for name in ("folder", "pretty.json", "datasets.Dataset"):
        result = SFTTrainer(*tiny, short(tmp_path=tmp_path / f"run_{name}")).train(src[name])
        assert result.stop_reason == "max_steps reached (2)", name


def test_real_datasets_dataset(tiny):
    datasets = pytest.importorskip("datasets")
    _, tok = tiny
    ds = datasets.Dataset.from_list(ROWS)
    assert SFTDataset(ds, tok).fingerprint() == SFTDataset(ROWS, tok).fingerprint()
    assert len(SFTDataset(datasets.DatasetDict(train=ds), tok)) == 4


def test_parquet(tiny, tmp_path):
    _, tok = tiny
    path = tmp_path / "d.parquet"
    if importlib.util.find_spec("pyarrow") is None:
        path.write_bytes(b"PAR1")
        with pytest.raises(DataError) as e:
            SFTDataset(path, tok)
        one_line(e, "d.parquet: reading .parquet files needs pyarrow: pip install pyarrow")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert SFTDataset(path, tok).fingerprint() == SFTDataset(ROWS, tok).fingerprint()
    pq.write_table(pa.Table.from_pylist([ROWS[0], {"prompt": "x", "response": ""}]), path)
    with pytest.raises(DataError) as e:
        SFTDataset(path, tok)
    one_line(e, "d.parquet row 1: field 'response': is empty")


def test_cli_data_folder_trains_on_train_and_evaluates_on_valid(tiny_dir, tmp_path, capsys):
    from test_cli import history, run_cli

    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    write_jsonl(folder / "valid.jsonl", ROWS[:2])
    write_jsonl(folder / "test.jsonl", [{"nonsense": 1}])  # never read
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "sft", "--model", tiny_dir, "--data", folder, "--output", out,
                         "--max-steps", 2, "--set", "batch_size=2", "--set", "warmup_steps=0")
    assert rc == 0, err
    assert any("eval/loss" in h for h in history(out))


# ================================================================== one-line errors
#: files the malformed cases read (a source "@name" is tmp_path / name)
BAD_FILES = {"u.jsonl": json.dumps({"question": "q", "answer": "a"}) + "\n",
             "m.jsonl": json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n",
             "pretty.json": json.dumps(ROWS[:2], indent=2)[:-2] + ',\n  {"prompt": "a",, }\n]',
             "missing.json": json.dumps([ROWS[0], {"prompt": "a"}], indent=2),
             "obj.json": json.dumps({"train": ROWS}, indent=2), "array.jsonl": json.dumps(ROWS, indent=2)}
ACCEPTED = "accepted: {messages} | {prompt, response} | {prompt, completion} | {text}"
#: name -> (source, dataset class, expected parts of the one-line error)
BAD = {
    "unrecognised row": ("@u.jsonl", SFTDataset, ["u.jsonl:1: unrecognised SFT row: fields found: question, answer",
                                                  ACCEPTED]),
    "unrecognised in memory": ([{"input": "q"}], SFTDataset, ["list row 0: unrecognised SFT row: fields found: input",
                                                              ACCEPTED]),
    "missing later field": ("@m.jsonl", SFTDataset, ["m.jsonl:2: field 'completion': missing (format prompt_completion, "
                                                     "detected from the first row: fields prompt, completion; this "
                                                     "row has: prompt)"]),
    "row index in memory": ([ROWS[0], {"prompt": 3, "response": "x"}, {"prompt": "a"}], SFTDataset,
                            ["list row 1: field 'prompt': must be a string, got int", "(and 1 more bad row)"]),
    "not a dict": ([ROWS[0], "text"], SFTDataset, ["list row 1: expected a dict (one record), got str"]),
    "empty list": ([], SFTDataset, ["list: is empty (no records)"]),
    "json array syntax": ("@pretty.json", SFTDataset, ["pretty.json:10 (row 2): malformed JSON"]),
    "json array field": ("@missing.json", SFTDataset, ["missing.json:6 (row 1): field 'response': missing"]),
    "array in .jsonl": ("@array.jsonl", SFTDataset, ["array.jsonl:1: malformed JSON", "name it .json)",
                                                     "more bad lines)"]),
    "json object": ("@obj.json", SFTDataset, ["obj.json: holds one JSON object; expected an array of rows"]),
    "folder without train": ("@", SFTDataset, [": is a folder without train.jsonl (mlx-lm's layout"]),
    "datasetdict without train": (FakeDatasetDict(test=FakeDataset(ROWS)), SFTDataset,
                                  ["datasets.FakeDatasetDict: has no 'train' split (has: test)"]),
    "last turn not assistant": ([{"messages": CONVERSATION[:2]}], SFTDataset,
                                ["list row 0: field 'messages': the last message must have role 'assistant'"]),
    "bad message": ([{"messages": [{"role": "user"}]}], SFTDataset,
                    ["list row 0: field 'messages[0]': must be an object with string 'role' and 'content'"]),
    "completion not a reply": ([{"prompt": "a", "completion": [{"role": "user", "content": "b"}]}], SFTDataset,
                               ["list row 0: field 'completion[0]': must have role 'assistant'"]),
    "preference unrecognised": ([{"prompt": "a", "chosen": "b"}], PreferenceDataset,
                                ["list row 0: unrecognised preference row: fields found: prompt, chosen; "
                                 "accepted: {prompt, chosen, rejected} | {chosen, rejected}"]),
    "implicit without shared prompt": ([{"chosen": [{"role": "user", "content": "a"}],
                                         "rejected": [{"role": "user", "content": "b"}]}], PreferenceDataset,
                                       ["list row 0: field 'chosen': shares no prompt with 'rejected'"]),
    "implicit mixed kinds": ([{"chosen": "a b", "rejected": [{"role": "user", "content": "a"}]}], PreferenceDataset,
                             ["field 'rejected': must be of the same kind as 'chosen'"]),
    "implicit identical": ([{"chosen": "a b", "rejected": "a b"}], PreferenceDataset,
                           ["field 'rejected': must differ from 'chosen'"]),
    "prompt unrecognised": ([{"question": "q", "answer": "a"}], PromptDataset,
                            ["list row 0: unrecognised prompt row: fields found: question, answer; accepted: {prompt}"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_data_is_one_line(case, tiny, tmp_path):
    _, tok = tiny
    for name, text in BAD_FILES.items():
        (tmp_path / name).write_text(text)
    src, cls, parts = BAD[case]
    if isinstance(src, str):
        src = tmp_path / src[1:]
    with pytest.raises(DataError) as e:
        cls(src, tok)
    one_line(e, *parts)


def test_error_structure_and_format_override(tiny, tmp_path):
    _, tok = tiny
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([ROWS[0], {"prompt": "a"}], indent=2))
    with pytest.raises(DataError) as e:
        SFTDataset(missing, tok)
    assert (e.value.file, e.value.line, e.value.row, e.value.field) == (str(missing), 6, 1, "response")
    with pytest.raises(DataError) as e:
        SFTDataset(ROWS, tok, format="text")
    assert (e.value.file, e.value.line, e.value.row, e.value.field) == ("list", None, 0, "text")
    one_line(e, "list row 0: field 'text': missing (format text, given: fields text; this row has: prompt, response)",
             "(and 3 more bad rows)")
    with pytest.raises(ValueError, match="format 'chatml' is not a SFT format; expected one of: messages, "
                                         "prompt_response, prompt_completion, text"):
        SFTDataset(ROWS, tok, format="chatml")
    assert SFTDataset([{"prompt": "a", "completion": "b"}], tok, format="completions").row_format.name == \
        "prompt_completion"
    with pytest.raises(TypeError, match="expected training data as a path"):
        SFTDataset(42, tok)

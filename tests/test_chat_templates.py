"""Chat templates as published: training targets and generation stops, token by token.

The fixtures are the tiny offline model with its tokenizer extended by each family's special
tokens and a chat template written here in that family's style (none is a published template):

* ``chatml``: Qwen2.5-like, a default system turn when none is given, ``<|im_end|>\\n`` after every
  turn, EOS = ``<|im_end|>``, generation_config EOS = [``<|im_end|>``, ``<|endoftext|>``];
* ``chatml_base``: the same template with EOS = ``<|endoftext|>`` (a base model's tokenizer):
  end of turn differs from EOS, and appending EOS would give two end tokens;
* ``llama3``: ``<|eot_id|>`` ends a turn, EOS = ``<|end_of_text|>``, no pad token,
  generation_config EOS a list holding both;
* ``gemma``: ``<end_of_turn>\\n`` ends a turn, EOS = ``<eos>``, and only EOS in the configs: the
  end of turn is found from the template;
* ``mistral``: no generation prompt, the EOS inside the assistant turn, no pad token;
* ``reasoning``: a generation prompt the rendered reply does not start with (the fallback path).
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import write_jsonl

CHATML = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
  {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' -}}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {{- '<|im_start|>system\nYou are a test assistant.<|im_end|>\n' -}}
  {%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
  {{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

LLAMA3 = r"""
{{- bos_token -}}
{%- for m in messages -%}
  {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
"""

GEMMA = r"""
{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}
  {%- set first = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}
{%- else -%}
  {%- set first = '' -%}{%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
  {%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}
  {{- '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}
"""

MISTRAL = r"""
{{- bos_token -}}
{%- for m in messages -%}
  {%- if m['role'] == 'user' -%}{{- '[INST] ' + m['content'] + ' [/INST]' -}}
  {%- elif m['role'] == 'assistant' -%}{{- m['content'] + eos_token -}}
  {%- else -%}{{- m['content'] + '\n\n' -}}{%- endif -%}
{%- endfor -%}
"""

REASONING = r"""
{%- for m in messages -%}
  {{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n<think>\n' -}}{%- endif -%}
"""

CHATML_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
FAMILIES = {
    # name: (added special tokens, template, eos, pad, bos, generation_config eos tokens, end of turn)
    "chatml": (CHATML_TOKENS, CHATML, "<|im_end|>", "<|endoftext|>", None, ["<|im_end|>", "<|endoftext|>"],
               "<|im_end|>"),
    "chatml_base": (CHATML_TOKENS, CHATML, "<|endoftext|>", "<|endoftext|>", None, ["<|endoftext|>"], "<|im_end|>"),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               LLAMA3, "<|end_of_text|>", None, "<|begin_of_text|>", ["<|end_of_text|>", "<|eot_id|>"],
               "<|eot_id|>"),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], GEMMA, "<eos>", "<pad>", "<bos>", ["<eos>"],
              "<end_of_turn>"),
    "mistral": (["<s>", "</s>"], MISTRAL, "</s>", None, "<s>", ["</s>"], "</s>"),
    "reasoning": (CHATML_TOKENS, REASONING, "<|im_end|>", "<|endoftext|>", None, ["<|im_end|>"], "<|im_end|>"),
}
#: the prompt "What is 2+3?" as each template renders it with the generation prompt
PROMPTS = {
    "chatml": "<|im_start|>system\nYou are a test assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
              "<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<bos><start_of_turn>user\nWhat is 2+3?<end_of_turn>\n<start_of_turn>model\n",
    "mistral": "<s>[INST] What is 2+3? [/INST]",
    "reasoning": "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n<think>\n",
}
PROMPTS["chatml_base"] = PROMPTS["chatml"]


def make_family(tiny_dir, dest, name):
    """A copy of the tiny model folder with ``name``'s tokens (embedding rows added), template and
    special-token settings."""
    from tokenizers import AddedToken, Tokenizer

    added, template, eos, pad, bos, gen_eos, _ = FAMILIES[name]
    shutil.copytree(tiny_dir, dest)
    tok = Tokenizer.from_file(str(dest / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.save(str(dest / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in added + ["<pad>", "<|end|>"]}
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg.update(chat_template=template.strip(), eos_token=eos, pad_token=pad, bos_token=bos)
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    (dest / "special_tokens_map.json").write_text(json.dumps(
        {k: v for k, v in (("eos_token", eos), ("pad_token", pad), ("bos_token", bos)) if v}))
    gen = [ids[t] for t in gen_eos]
    gen = gen[0] if len(gen) == 1 else gen
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": gen}))
    config = json.loads((dest / "config.json").read_text())
    vocab = tok.get_vocab_size()
    config.update(vocab_size=vocab, eos_token_id=gen, pad_token_id=ids[pad] if pad else None,
                  bos_token_id=ids[bos] if bos else None)
    (dest / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(dest / "model.safetensors"))
    emb = weights["model.embed_tokens.weight"]
    extra = 0.02 * mx.random.normal((vocab - emb.shape[0], emb.shape[1]), key=mx.random.key(1))
    weights["model.embed_tokens.weight"] = mx.concatenate([emb, extra.astype(emb.dtype)])
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    return dest


@pytest.fixture(scope="module")
def family_dirs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: make_family(tiny_dir, root / name, name) for name in FAMILIES}


@pytest.fixture(scope="module")
def families(family_dirs):
    """name -> (model, tokenizer), loaded the way Lazarus loads any model folder."""
    from lazarus.models import load_model

    return {name: load_model(d) for name, d in family_dirs.items()}


def _enc(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


def _end(tok, name):
    return tok.convert_tokens_to_ids(FAMILIES[name][6])


def _trained(batch, row):
    """(targets, mask) of one collated row as numpy."""
    return np.array(batch["targets"][row]), np.array(batch["mask"][row])


ALL = list(FAMILIES) + ["tiny"]


def _tok(families, tiny, name):
    return tiny[1] if name == "tiny" else families[name][1]


@pytest.mark.parametrize("name", ALL)
def test_sft_targets_end_with_exactly_one_end_token(name, families, tiny, tmp_path):
    from lazarus.data import SFTDataset
    from lazarus.data.chat import stop_ids

    tok = _tok(families, tiny, name)
    end = tok.convert_tokens_to_ids("<|end|>") if name == "tiny" else _end(tok, name)
    f = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "What is 2+3?", "response": "5"},
                                             {"prompt": "Say hello to the world", "response": "hello world"}])
    ds = SFTDataset(f, tok)
    batch = ds.collate([0, 1])
    stops = stop_ids(tok)
    for row, (example, reply) in enumerate(zip(ds.examples, ["5", "hello world"])):
        # the prompt, token by token, is the template's rendering with the generation prompt
        if row == 0 and name in PROMPTS:
            assert example.ids[: example.prompt_len] == _enc(tok, PROMPTS[name])
        # what is trained: the reply's tokens and one end token, nothing after it
        targets, mask = _trained(batch, row)
        trained = targets[mask > 0].tolist()
        assert trained == _enc(tok, reply) + [end], (name, tok.decode(trained))
        assert [t in stops for t in trained].count(True) == 1
        assert trained[-1] == end
        # the trained positions are one contiguous run ending at the last real target
        n = len(example.ids) - 1
        assert mask[example.prompt_len - 1: n].all() and not mask[: example.prompt_len - 1].any()
        assert not mask[n:].any()  # padding is never trained


@pytest.mark.parametrize("name", ["chatml", "chatml_base"])
def test_no_double_eos_and_nothing_after_the_end_of_turn(name, families, tmp_path):
    """ChatML puts ``<|im_end|>\\n`` after a reply: neither the newline nor an appended EOS is trained."""
    from lazarus.data import SFTDataset

    tok = families[name][1]
    ds = SFTDataset(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is 2+3?", "response": "5"}]), tok)
    e = ds.examples[0]
    reply = e.ids[e.prompt_len:]
    assert reply == _enc(tok, "5") + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.convert_tokens_to_ids("<|endoftext|>") not in e.ids
    assert _enc(tok, "\n")[0] != reply[-1]


def test_default_system_prompt_is_in_the_prompt(families, tmp_path):
    from lazarus.data import PreferenceDataset, PromptDataset, SFTDataset, chat_prompt_ids

    tok = families["chatml"][1]
    system = _enc(tok, "<|im_start|>system\nYou are a test assistant.<|im_end|>\n")
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2+3?", "response": "5", "chosen": "5",
                                            "rejected": "6"}])
    for ds in (SFTDataset(f, tok), PromptDataset(f, tok)):
        ids = ds.examples[0].ids
        assert ids[: len(system)] == system
    assert PreferenceDataset(f, tok).examples[0].prompt[: len(system)] == system
    assert chat_prompt_ids(tok, "What is 2+3?")[: len(system)] == system
    # a system prompt of one's own replaces the default one
    own = SFTDataset(f, tok, system_prompt="Be brief.").examples[0].ids
    assert own[:len(_enc(tok, "<|im_start|>system\nBe brief.<|im_end|>\n"))] == _enc(
        tok, "<|im_start|>system\nBe brief.<|im_end|>\n")
    assert tok.decode(own).count("test assistant") == 0


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma", "mistral"])
def test_messages_multi_turn(name, families, tmp_path):
    """Every assistant turn is a target, each with its one end token; user turns and what follows an end
    token are masked."""
    from lazarus.data import SFTDataset

    tok = families[name][1]
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 3+4?"}, {"role": "assistant", "content": "7"}]
    ds = SFTDataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]), tok)
    e = ds.examples[0]
    first = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
    assert e.ids[: e.prompt_len] == _enc(tok, first)
    last = _enc(tok, "7") + [_end(tok, name)]
    assert e.ids[-len(last):] == last
    targets, mask = _trained(ds.collate([0]), 0)
    assert targets[mask > 0].tolist() == _enc(tok, "5") + [_end(tok, name)] + last


@pytest.mark.parametrize("name", ALL)
def test_preference_targets(name, families, tiny, tmp_path):
    from lazarus.data import PreferenceDataset

    tok = _tok(families, tiny, name)
    end = tok.convert_tokens_to_ids("<|end|>") if name == "tiny" else _end(tok, name)
    rows = [{"prompt": "What is 2+3?", "chosen": "5", "rejected": "six or so"},
            {"prompt": "What is 1+1?", "chosen": "2", "rejected": "3"}]
    ds = PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", rows), tok)
    batch = ds.collate([0, 1])
    expected = [_enc(tok, t) + [end] for t in ("5", "2", "six or so", "3")]  # chosen rows, then rejected
    for row, want in enumerate(expected):
        targets, mask = _trained(batch, row)
        assert targets[mask > 0].tolist() == want
    if name in PROMPTS:
        assert ds.examples[0].prompt == _enc(tok, PROMPTS[name])


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_dataset_ends_with_the_generation_prompt(name, families, tmp_path):
    from lazarus.data import PromptDataset, chat_prompt_ids

    tok = families[name][1]
    ds = PromptDataset(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2+3?", "answer": "5"}]), tok)
    assert ds.examples[0].ids == _enc(tok, PROMPTS[name]) == chat_prompt_ids(tok, "What is 2+3?")


def test_without_a_pad_token_eos_pads_and_is_never_trained(families, tmp_path):
    from lazarus.data import PreferenceDataset, SFTDataset

    tok = families["llama3"][1]
    assert tok.pad_token_id is None
    eos = tok.eos_token_id
    rows = [{"prompt": "What is 2+3?", "response": "5", "chosen": "5", "rejected": "6"},
            {"prompt": "Say hello to the world please", "response": "hello world and more words",
             "chosen": "hello world and more words", "rejected": "no"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    for ds in (SFTDataset(f, tok), PreferenceDataset(f, tok)):
        assert ds.pad_id == eos
        batch = ds.collate([0, 1])
        targets, mask = np.array(batch["targets"]), np.array(batch["mask"])
        assert (targets == eos).any()  # there is padding, and it is EOS
        assert not mask[targets == eos].any()  # never trained
        # every trained row ends with <|eot_id|>, never with the EOS that pads
        for t, m in zip(targets, mask):
            assert t[m > 0][-1] == _end(tok, "llama3")


def test_truncated_reply_has_no_end_token(families, tmp_path):
    from lazarus.data import PreferenceDataset, SFTDataset
    from lazarus.data.chat import stop_ids

    tok = families["chatml"][1]
    rows = [{"prompt": "Hi", "response": "hello world " * 20, "chosen": "hello world " * 20, "rejected": "no"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    prompt_len = len(_enc(tok, tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                       add_generation_prompt=True, tokenize=False)))
    limit = prompt_len + 5
    with pytest.warns(UserWarning, match="1 examples truncated"):
        ds = SFTDataset(f, tok, max_length=limit)
    e = ds.examples[0]
    assert len(e.ids) == limit and not set(e.ids[e.prompt_len:]) & stop_ids(tok)
    with pytest.warns(UserWarning, match="1 dropped"):
        with pytest.raises(Exception, match="no usable"):
            SFTDataset(f, tok, max_length=limit, truncation="drop")
    with pytest.warns(UserWarning, match="1 pairs truncated"):
        pairs = PreferenceDataset(f, tok, max_length=limit)
    assert pairs.examples[0].chosen[-1] not in stop_ids(tok)
    assert pairs.examples[0].rejected[-1] == _end(tok, "chatml")  # short enough: ends as it should
    # a reply fitting exactly keeps its end token
    ok = SFTDataset(write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "Hi", "response": "5"}]), tok,
                    max_length=prompt_len + 2)
    assert ok.examples[0].ids[-1] == _end(tok, "chatml")


def test_fallback_when_the_prompt_is_not_a_prefix(families, tmp_path):
    """The reasoning template's generation prompt opens a <think> the rendered reply lacks: the reply
    is its text tokenized plus the template's end-of-turn token."""
    from lazarus.data import SFTDataset

    tok = families["reasoning"][1]
    ds = SFTDataset(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is 2+3?", "response": "5"}]), tok)
    e = ds.examples[0]
    assert e.ids[: e.prompt_len] == _enc(tok, PROMPTS["reasoning"])
    assert e.ids[e.prompt_len:] == _enc(tok, "5") + [_end(tok, "reasoning")]


def test_without_the_template_the_reply_ends_with_eos(families, tmp_path):
    from lazarus.data import SFTDataset

    tok = families["gemma"][1]
    ds = SFTDataset(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is 2+3?", "response": "5"}]), tok,
                    use_chat_template=False)
    e = ds.examples[0]
    assert e.ids[e.prompt_len:] == _enc(tok, "5") + [tok.eos_token_id]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_generation_stops_at_the_end_of_turn_token(name, families, family_dirs):
    from lazarus.data.chat import end_of_turn_id
    from lazarus.training.generation import eos_token_ids, generate_completions

    model, tok = families[name]
    end = _end(tok, name)
    assert end_of_turn_id(tok) == end
    stops = eos_token_ids(tok)
    assert end in stops and tok.eos_token_id in stops
    if name == "llama3":  # generation_config.json's list is honoured
        assert stops == {tok.convert_tokens_to_ids("<|end_of_text|>"), end}
    if name == "gemma":  # only the template says <end_of_turn> ends a reply: the configs name <eos> alone
        for f in ("config.json", "generation_config.json"):
            assert json.loads((family_dirs[name] / f).read_text())["eos_token_id"] == tok.eos_token_id != end

    class Forced(nn.Module):
        """The model with one token's logit raised far above the rest."""

        def __init__(self, inner, token):
            super().__init__()
            self.inner, self.token = inner, token

        @property
        def layers(self):
            return self.inner.layers

        def __call__(self, x, cache=None):
            logits = self.inner(x, cache=cache)
            return logits + 1e4 * (mx.arange(logits.shape[-1]) == self.token)

    prompt = [tok.encode("What is 2+3?", add_special_tokens=False)]
    comps = generate_completions(Forced(model, end), tok, prompt, max_tokens=5, temperature=0.0)
    assert comps.completion_ids == [[end]] and comps.finished == [True]
    other = _enc(tok, "5")[0]
    comps = generate_completions(Forced(model, other), tok, prompt, max_tokens=5, temperature=0.0)
    assert comps.completion_ids == [[other] * 5] and comps.finished == [False]


def test_sft_trains_on_a_template_without_pad_token(family_dirs, tmp_path):
    """A short SFT run on the llama3-style tokenizer (no pad token, EOS distinct from end of turn)."""
    import math

    from conftest import EXAMPLES
    from lazarus.data import SFTDataset
    from lazarus.models import load_model
    from lazarus.training import SFTConfig, SFTTrainer

    model, tok = load_model(family_dirs["llama3"])
    ds = SFTDataset(EXAMPLES / "sft_train.jsonl", tok)
    config = SFTConfig(max_steps=3, batch_size=4, warmup_steps=0, log_interval=1, learning_rate=1e-3,
                       checkpoint_interval=None, checkpoint_dir=str(tmp_path / "ckpt"))
    result = SFTTrainer(model, tok, config).train(ds)
    assert len(result.history) >= 3 and all(math.isfinite(h["loss"]) for h in result.history if "loss" in h)


@pytest.mark.parametrize("name", ["chatml", "llama3", "gemma", "mistral"])
def test_loaded_tokenizers_stop_mlx_lm_generate_at_the_end_of_turn(name, families):
    """mlx-lm's generate (used by `lazarus generate` and the demo) stops at tokenizer.eos_token_ids: load_model
    adds the template's end-of-turn token there, also when the configs name only <eos> (gemma)."""
    tok = families[name][1]
    assert _end(tok, name) in tok.eos_token_ids

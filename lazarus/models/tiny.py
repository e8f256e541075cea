"""The embedded tiny model: a random-init mlx-lm llama plus a BPE tokenizer, fully offline."""

from __future__ import annotations

import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "data" / "examples"
SPECIAL_TOKENS = ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _corpus(extra_texts=()) -> list[str]:
    texts = list(extra_texts)
    for f in sorted(EXAMPLES.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                texts.extend(v for v in json.loads(line).values() if isinstance(v, str))
    texts.append(" ".join(str(i) for i in range(200)))
    texts.append("The answer is yes no true false hello world .,;:!?+-*/=()")
    return texts


def build_tokenizer(vocab_size: int = 384, extra_texts=()):
    """Byte-level BPE with digits split one per token (helps arithmetic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(extra_texts), trainer=trainer)
    return tok


def create_tiny_model(directory: str | Path, *, hidden_size: int = 128, num_layers: int = 4,
                      num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 256,
                      vocab_size: int = 384, max_position_embeddings: int = 512, seed: int = 0,
                      extra_texts=()) -> Path:
    """Write a loadable model folder (``config.json``, ``model.safetensors``, ``tokenizer.json``,
    ``tokenizer_config.json`` with a chat template). Defaults give ~0.7M parameters."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size, extra_texts)
    tok.save(str(directory / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    eos_id = tok.token_to_id("<|end|>")
    pad_id = tok.token_to_id("<pad>")
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden_size,
        "num_hidden_layers": num_layers, "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "rms_norm_eps": 1e-5,
        "vocab_size": vocab, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "max_position_embeddings": max_position_embeddings, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "bos_token_id": None, "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end|>", "pad_token": "<pad>",
        "bos_token": None, "unk_token": None, "chat_template": CHAT_TEMPLATE,
        "model_max_length": max_position_embeddings, "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False,
    }, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end|>", "pad_token": "<pad>"}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id, "pad_token_id": pad_id}))
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    return directory

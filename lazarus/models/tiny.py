"""The embedded tiny model: random-init mlx-lm models plus a BPE tokenizer, fully offline.

``create_tiny_model`` writes a folder shaped like a published checkpoint (``config.json`` with
``torch_dtype``, ``model.safetensors`` + ``model.safetensors.index.json``, tokenizer files,
``generation_config.json``) for several architectures (:data:`ARCHITECTURES`), in float32,
bfloat16 or float16, optionally 4-bit quantized the way ``mlx_lm.convert(..., quantize=True)``
writes it (a ``quantization`` entry in ``config.json``, packed weights with scales/biases in the
model's dtype), with tied or untied embeddings. The defaults (a float32 llama with tied
embeddings) are the model ``lazarus init-model`` and the demo use."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "data" / "examples"
SPECIAL_TOKENS = ["<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
#: Architectures ``create_tiny_model`` builds (each with mlx-lm's own model class).
ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma3")
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


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


def _arch_config(arch: str, *, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 intermediate_size: int, vocab: int, max_position_embeddings: int, tie: bool,
                 head_dim: int | None, sliding_window: int) -> tuple[str, dict]:
    """(mlx-lm module name, Hugging Face style config) of one architecture, with what its mlx-lm
    model class needs. ``head_dim`` None: hidden_size // num_heads, except qwen3 and gemma3, whose
    published checkpoints decouple it from the width (here 2 x hidden_size // num_heads)."""
    common = {"hidden_size": hidden_size, "num_hidden_layers": num_layers, "intermediate_size": intermediate_size,
              "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "vocab_size": vocab,
              "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": tie}
    wide_head = head_dim or 2 * hidden_size // num_heads
    if arch == "llama":
        # the original tiny model's keys, in the original order (same init, same weights)
        return "llama", {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden_size,
                         "num_hidden_layers": num_layers, "intermediate_size": intermediate_size,
                         "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
                         "rms_norm_eps": 1e-5, "vocab_size": vocab, "rope_theta": 10000.0,
                         "tie_word_embeddings": tie, "max_position_embeddings": max_position_embeddings,
                         **({"head_dim": head_dim} if head_dim else {})}
    if arch == "qwen2":  # bias on q/k/v (always, in Qwen2)
        if head_dim and head_dim != hidden_size // num_heads:
            raise ValueError("qwen2 derives head_dim from hidden_size // num_heads")
        return "qwen2", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **common,
                         "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
                         "use_sliding_window": False, "sliding_window": max_position_embeddings,
                         "max_window_layers": num_layers, "attention_dropout": 0.0}
    if arch == "qwen3":  # q/k RMSNorm, explicit head_dim
        return "qwen3", {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], **common,
                         "head_dim": wide_head, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                         "hidden_act": "silu", "attention_bias": False, "use_sliding_window": False,
                         "sliding_window": None, "max_window_layers": num_layers, "attention_dropout": 0.0}
    if arch == "phi3":  # fused qkv_proj / gate_up_proj, LongRoPE (Phi-3.5 style)
        if head_dim and head_dim != hidden_size // num_heads:
            raise ValueError("phi3 derives head_dim from hidden_size // num_heads")
        half = hidden_size // num_heads // 2
        original = max(16, max_position_embeddings // 4)
        return "phi3", {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], **common,
                        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
                        "original_max_position_embeddings": original, "partial_rotary_factor": 1.0,
                        "rope_scaling": {"type": "longrope",
                                         "short_factor": [1.0 + 0.05 * i for i in range(half)],
                                         "long_factor": [1.0 + 0.5 * i for i in range(half)]},
                        "attention_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
    if arch == "gemma3":  # gemma3_text: sliding-window + global layers, q/k norms, (1 + w) RMSNorm, GELU MLP
        return "gemma3_text", {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], **common,
                               "head_dim": wide_head, "query_pre_attn_scalar": wide_head, "rms_norm_eps": 1e-6,
                               "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
                               "sliding_window": sliding_window, "sliding_window_pattern": 2,
                               "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
                               "attn_logit_softcapping": None, "attention_bias": False}
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def _group_size(model, bits: int) -> int:
    """64 (mlx-lm's default) when every linear/embedding input width allows it, else 32."""
    import mlx.nn as nn

    widths = [m.weight.shape[-1] for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    for g in (64, 32):
        if all(w % g == 0 for w in widths):
            return g
    raise ValueError(f"cannot quantize to {bits} bits: input widths {sorted(set(widths))} are not multiples of 32")


def create_tiny_model(directory: str | Path, *, arch: str = "llama", dtype: str = "float32",
                      quantize_bits: int | None = None, group_size: int | None = None, tie_embeddings: bool = True,
                      hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
                      intermediate_size: int = 256, vocab_size: int = 384, max_position_embeddings: int = 512,
                      head_dim: int | None = None, sliding_window: int = 16, seed: int = 0,
                      extra_texts=()) -> Path:
    """Write a loadable model folder shaped like a published checkpoint. Defaults give a ~0.7M
    parameter float32 llama with tied embeddings.

    ``arch``: one of :data:`ARCHITECTURES` (mlx-lm's ``llama``, ``qwen2``, ``qwen3``, ``phi3``,
    ``gemma3_text`` classes); ``dtype``: the weights' dtype (``torch_dtype`` in ``config.json``);
    ``quantize_bits``: e.g. 4 for an mlx-community style quantized model (``mlx_lm``'s
    ``quantize_model``: scales/biases in ``dtype``, group size 64 where widths allow, else 32, or
    ``group_size``); ``tie_embeddings``: the output projection is the embedding (else a separate
    ``lm_head``); ``sliding_window``: gemma3's local attention window (small, so short sequences
    use it)."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import quantize_model, save_config, save_model
    import importlib

    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    if quantize_bits is not None and quantize_bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"quantize_bits must be one of 2, 3, 4, 5, 6, 8 (or None), got {quantize_bits!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size, extra_texts)
    tok.save(str(directory / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    eos_id = tok.token_to_id("<|end|>")
    pad_id = tok.token_to_id("<pad>")
    module_name, config = _arch_config(arch, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                       num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, vocab=vocab,
                                       max_position_embeddings=max_position_embeddings, tie=tie_embeddings,
                                       head_dim=head_dim, sliding_window=sliding_window)
    config.update({"eos_token_id": eos_id, "pad_token_id": pad_id, "bos_token_id": None, "torch_dtype": dtype})
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end|>", "pad_token": "<pad>",
        "bos_token": None, "unk_token": None, "chat_template": CHAT_TEMPLATE,
        "model_max_length": max_position_embeddings, "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False,
    }, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end|>", "pad_token": "<pad>"}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id, "pad_token_id": pad_id}))

    arch_module = importlib.import_module(f"mlx_lm.models.{module_name}")
    mx.random.seed(seed)
    model = arch_module.Model(arch_module.ModelArgs.from_dict(config))
    if tie_embeddings and "lm_head" in model:  # gemma3 builds lm_head always; a tied checkpoint has none
        model.pop("lm_head")
        model.tie_word_embeddings = True
    if dtype != "float32":  # as mlx_lm.convert(dtype=...): floating weights cast where the model allows
        target = getattr(mx, dtype)
        keep = getattr(model, "cast_predicate", lambda _: True)
        model.update(tree_map_with_path(
            lambda k, v: v.astype(target) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters()))
    if quantize_bits is not None:
        group = group_size or _group_size(model, quantize_bits)
        with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints bits per weight
            model, config = quantize_model(model, config, group, quantize_bits)
    mx.eval(model.parameters())
    save_model(directory, model)
    save_config(config, directory / "config.json")
    return directory

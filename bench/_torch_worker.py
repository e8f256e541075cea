"""One PyTorch-side run for bench/vs_torch.py, executed by the torch virtualenv's Python.

    bench/.torch-venv/bin/python bench/_torch_worker.py {trl,trl-defaults,bare} {lora,full} MODEL_DIR TOKENS.json
    bench/.torch-venv/bin/python bench/_torch_worker.py profile - MODEL_DIR SPEC_JSON   (bench/profile_step.py)

Trains one epoch of the pre-tokenized examples in TOKENS.json (token ids, prompt lengths and
Lazarus's batch order) on the Hugging Face llama loaded from MODEL_DIR, in float32 on the CPU,
and prints one JSON line: seconds, target tokens, peak RSS. ``trl`` is TRL's ``SFTTrainer``
(constant LR, no gradient checkpointing, float32: its fastest settings for this comparison);
``trl-defaults`` is the same trainer with gradient checkpointing and bf16 autocast left on, as
TRL ships them (what a user gets without tuning);
``bare`` is a hand-written loop over the same batches Lazarus draws (right padding, AdamW).
LoRA is PEFT's, rank 8 on every linear layer of the blocks with mlx-lm's scale (alpha = 20 x rank).
"""

import json
import resource
import sys
import time

from _timing import best_of_each  # bench/ is this script's folder, first on sys.path


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def load(model_dir: str, mode: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=160, lora_dropout=0.0, target_modules=targets))
    return model


#: TRL's speed-relevant defaults that the tuned runs ("trl") override: gradient checkpointing and
#: bf16 autocast are on in TRL's SFTConfig/DPOConfig. "trl-defaults" runs leave them as shipped.
TUNED = {"bf16": False, "gradient_checkpointing": False}


def run_trl(model, data, lr, batch, tuned=True):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = {"input_ids": [e["ids"] for e in data["examples"]],
            "labels": [[-100] * e["prompt_len"] + e["ids"][e["prompt_len"]:] for e in data["examples"]]}
    args = SFTConfig(output_dir=data["tmp"], per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=lr,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     logging_steps=10 ** 6, save_strategy="no", report_to="none", use_cpu=True,
                     dataloader_num_workers=0, max_length=None, seed=0, disable_tqdm=True, **(TUNED if tuned else {}))
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(data["model_dir"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tok)
    t = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t


def run_bare(model, data, lr, batch):
    import torch

    ex = data["examples"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pad = data["pad_id"]
    model.train()
    t = time.perf_counter()
    for idx in data["batches"]:
        width = max(len(ex[i]["ids"]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            e = ex[i]
            n = len(e["ids"])
            ids[r, :n] = torch.tensor(e["ids"])
            attn[r, :n] = 1
            labels[r, e["prompt_len"]:n] = torch.tensor(e["ids"][e["prompt_len"]:])
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def run_trl_dpo(model, data, lr, batch, tuned=True):
    """TRL's DPOTrainer on the same preference pairs (text; TRL tokenizes them with the same
    tokenizer and appends EOS), reference = the policy with its adapters disabled, beta 0.1."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in open(data["pairs"])]
    args = DPOConfig(output_dir=data["tmp"], per_device_train_batch_size=batch, max_steps=data["steps"],
                     learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     logging_steps=10 ** 6, save_strategy="no", report_to="none", use_cpu=True,
                     dataloader_num_workers=0, seed=0, disable_tqdm=True, beta=0.1, **(TUNED if tuned else {}))
    tok = PreTrainedTokenizerFast.from_pretrained(data["model_dir"])
    ds = Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")})
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    t = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t


def profile(model_dir: str, spec: dict) -> dict:
    """bench/profile_step.py's PyTorch side: one step at a fixed shape, whole and in parts."""
    import torch

    model = load(model_dir, "lora" if spec["lora"] else "full", 2)
    model.train()
    x = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["tokens"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)

    def step(clipped):
        model(input_ids=x, labels=x).loss.backward()
        if clipped:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = best_of_each({"step": lambda: step(False), "step, clipped": lambda: step(True)}, spec["repeats"])
    model(input_ids=x, labels=x).loss.backward()
    res["optimizer"] = best_of_each({"opt": opt.step}, spec["repeats"])["opt"]
    gemms = 0.0
    for times, heads, m, k, n in spec["shapes"]:
        a, b = torch.randn(heads, m, k), torch.randn(heads, k, n)
        gemms += times * best_of_each({"mm": lambda: torch.matmul(a, b)}, spec["repeats"])["mm"]
    res["gemms"] = gemms
    return res


def main():
    kind, mode, model_dir, tokens = sys.argv[1:5]
    if kind == "profile":
        print(json.dumps(profile(model_dir, json.loads(tokens))))
        return
    data = json.loads(open(tokens).read())
    data["model_dir"] = model_dir
    model = load(model_dir, "lora" if mode == "dpo" else mode, data["threads"])
    if kind == "bare":
        seconds = run_bare(model, data, data["lr"], data["batch"])
    else:
        run = run_trl_dpo if mode == "dpo" else run_trl
        seconds = run(model, data, data["lr"], data["batch"], tuned=kind == "trl")
    print(json.dumps({"seconds": seconds, "target_tokens": data["target_tokens"], "steps": data.get("steps"),
                      "peak_rss_gb": peak_rss_gb()}))


if __name__ == "__main__":
    main()

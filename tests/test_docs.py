"""Docs are tests: every fenced ``python`` and ``bash`` block of README.md and docs/*.md runs.

The convention (stated for readers in docs/index.md, "How the examples are tested"):

* The blocks of one file run in order in one fresh folder, as a user would paste them: python
  blocks share one namespace (a later block may use what an earlier one defined), bash blocks run
  in ``bash -e`` with the project's ``.venv/bin`` first on ``PATH``.
* Placeholders are real: the folder holds a tiny offline model (8 blocks) at every placeholder model path
  (``path/to/model``, ``path/to/hf-or-mlx-model-dir``, ``m``, ``BASE``), a few rows of the shipped
  example data at the placeholder data paths (``data/train.jsonl``, ``data/eval.jsonl``,
  ``data/preferences.jsonl``, ``data/prompts.jsonl``, ``prefs.jsonl``, ``prompts.jsonl``,
  ``prompts_eval.jsonl``), the
  repository's ``examples/`` and ``lazarus/data/examples/``, and a short earlier run's
  ``checkpoints/`` (``step_500``, ``best``) and LoRA adapters in ``run/checkpoints``.
* A python block that continues the prose ("given a model, a loader and a loss") sees the public
  API already imported and these sample objects: ``model``/``tokenizer``/``tok`` (the tiny model),
  ``dataset``/``evalset`` (SFT data), ``config`` (a short ``SFTConfig``), ``trainer`` (an
  ``SFTTrainer`` of that model), ``train_loader`` and ``compute_loss`` (an SFT loader and loss).
* A block that must not run is preceded by ``<!-- docs-test: skip (the reason) -->``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!-- docs-test: skip \((.+?)\) -->\s*$")
MODEL_PLACEHOLDERS = ["path/to/model", "path/to/hf-or-mlx-model-dir", "m", "BASE"]
DATA_PLACEHOLDERS = {"data/train.jsonl": "sft_train.jsonl", "data/eval.jsonl": "sft_eval.jsonl",
                     "data/preferences.jsonl": "preferences.jsonl", "data/prompts.jsonl": "prompts_train.jsonl",
                     "prefs.jsonl": "preferences.jsonl", "prompts.jsonl": "prompts_train.jsonl",
                     "prompts_eval.jsonl": "prompts_eval.jsonl"}
ROWS = 32  # rows of each shipped example file at the placeholder data paths


def blocks(path: Path) -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, skip reason or None) of every python/bash block in ``path``."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) not in ("python", "bash"):
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        out.append((text[: m.start()].count("\n") + 1, m.group(1), m.group(2), skip.group(1) if skip else None))
    return out


def test_every_doc_with_code_is_collected_and_skips_give_reasons():
    found = {p.relative_to(REPO).as_posix(): blocks(p) for p in DOCS}
    assert sum(len(b) for b in found.values()) >= 25
    for name, bs in found.items():
        for line, _, _, reason in bs:
            assert reason is None or len(reason) > 10, f"{name}:{line}: a skipped block needs a real reason"
    # a marker that is not directly above a block is a typo, not a skip
    for p in DOCS:
        text = p.read_text()
        for m in re.finditer(r"<!-- docs-test:.*?-->", text):
            assert SKIP.search(m.group(0)), f"{p.name}: malformed marker {m.group(0)}"
            assert text[m.end():].lstrip(" ").startswith("\n```"), f"{p.name}: {m.group(0)} is not right above a block"


@pytest.fixture(scope="session")
def docs_model(tmp_path_factory):
    """The placeholder model: tiny, with 8 blocks (examples pick `lora_layers=8`)."""
    from lazarus.models import create_tiny_model

    d = tmp_path_factory.mktemp("docs_model")
    create_tiny_model(d, hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=128)
    return d


@pytest.fixture(scope="session")
def earlier_run(tmp_path_factory, docs_model):
    """A short SFT run's checkpoints (step_500, best) and a LoRA run's adapters, made once."""
    import lazarus  # noqa: F401
    from lazarus.data import SFTDataset
    from lazarus.models import load_model
    from lazarus.training import SFTConfig, SFTTrainer

    root = tmp_path_factory.mktemp("earlier_run")
    data = REPO / "lazarus" / "data" / "examples"
    train = first_rows(data / "sft_train.jsonl", root / "data" / "train.jsonl")  # the workspace's data/train.jsonl
    model, tok = load_model(docs_model)
    # the sample `config` below, run longer: a block resuming `trainer` from step_500 changes nothing else
    SFTTrainer(model, tok, SFTConfig(max_steps=500, batch_size=4, warmup_steps=0, checkpoint_interval=500,
                                     eval_interval=250, checkpoint_dir=str(root / "checkpoints"))).train(
        SFTDataset(train, tok), eval_dataset=SFTDataset(data / "sft_eval.jsonl", tok))
    model, tok = load_model(docs_model, use_lora=True, lora_rank=4)
    SFTTrainer(model, tok, SFTConfig(max_steps=2, batch_size=2, checkpoint_dir=str(root / "run" / "checkpoints"))
               ).train(SFTDataset(data / "sft_train.jsonl", tok))
    return root


def first_rows(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(src.read_text().splitlines(keepends=True)[:ROWS]))
    return dest


def workspace(tmp: Path, tiny_dir: Path, earlier_run: Path) -> Path:
    for name in MODEL_PLACEHOLDERS:
        shutil.copytree(tiny_dir, tmp / name)
    shipped = REPO / "lazarus" / "data" / "examples"
    for dest, src in DATA_PLACEHOLDERS.items():
        first_rows(shipped / src, tmp / dest)
    (tmp / "examples").symlink_to(REPO / "examples")
    (tmp / "lazarus" / "data").mkdir(parents=True)
    (tmp / "lazarus" / "data" / "examples").symlink_to(shipped)
    shutil.copytree(earlier_run / "checkpoints", tmp / "checkpoints")
    shutil.copytree(earlier_run / "run", tmp / "run")
    return tmp


def sample_namespace() -> dict:
    """The public API, imported, and the sample objects the prose of a block refers to."""
    ns: dict = {}
    exec("from lazarus import *\nfrom lazarus.models import *\nfrom lazarus.data import *\n"
         "from lazarus.training import *\nfrom lazarus.callbacks import *\n"
         "from lazarus.data import DataLoader\n", ns)
    model, tok = ns["load_model"]("path/to/model")
    dataset = ns["SFTDataset"]("data/train.jsonl", tok)
    config = ns["SFTConfig"](max_steps=4, batch_size=4, warmup_steps=0)
    trainer = ns["SFTTrainer"](model, tok, config)
    ns.update(model=model, tokenizer=tok, tok=tok, dataset=dataset, evalset=ns["SFTDataset"]("data/eval.jsonl", tok),
              config=config, trainer=trainer, train_loader=ns["DataLoader"](dataset, 4, collate_fn=dataset.collate),
              compute_loss=trainer.compute_loss)
    return ns


@pytest.mark.parametrize("doc", [p for p in DOCS if any(b[3] is None for b in blocks(p))],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_doc_code_blocks_run(doc, tmp_path, docs_model, earlier_run, monkeypatch):
    ws = workspace(tmp_path, docs_model, earlier_run)
    monkeypatch.chdir(ws)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    ns = None
    for line, lang, code, skip in blocks(doc):
        if skip:
            continue
        where = f"{doc.relative_to(REPO)}:{line}"
        if lang == "bash":
            proc = subprocess.run(["bash", "-e", "-c", code], cwd=ws, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, f"{where} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        else:
            ns = sample_namespace() if ns is None else ns
            try:
                exec(compile(code, where, "exec"), ns)
            except Exception as e:  # noqa: BLE001 - report which block broke
                raise AssertionError(f"{where} failed: {type(e).__name__}: {e}") from e

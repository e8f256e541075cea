import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "LAZARUS_CACHE_DIR" not in os.environ:  # autotune verdicts: measured once per test session, not read from ~
    import tempfile

    os.environ["LAZARUS_CACHE_DIR"] = tempfile.mkdtemp(prefix="lazarus-cache-")

import lazarus  # noqa: E402,F401  (BLAS fast path before mlx.core)
import pytest  # noqa: E402
from pathlib import Path  # noqa: E402

EXAMPLES = Path(lazarus.__file__).parent / "data" / "examples"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A very small llama (hidden 64, 2 blocks, ~0.1M params) with the shipped tokenizer."""
    from lazarus.models import create_tiny_model

    d = tmp_path_factory.mktemp("tiny")
    create_tiny_model(d, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    return d


@pytest.fixture
def tiny(tiny_dir):
    from lazarus.models import load_model

    return load_model(tiny_dir)


@pytest.fixture
def tiny_lora(tiny_dir):
    from lazarus.models import load_model

    return load_model(tiny_dir, use_lora=True, lora_rank=4)


@pytest.fixture
def examples():
    return EXAMPLES


def write_jsonl(path, rows):
    import json

    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def stop_at(n):
    """A callback that requests a stop after step ``n`` (a deterministic stand-in for an interruption)."""
    from lazarus.callbacks import Callback

    class StopAt(Callback):
        def on_step_end(self, state):
            if state.step + 1 == n:
                state.request_stop("test")

    return StopAt()


@pytest.fixture(scope="session")
def model_zoo(tmp_path_factory):
    """``model_zoo(arch, dtype="bfloat16", bits=None, tie=True) -> Path``: a tiny published-style
    model folder (``create_tiny_model``: mlx-lm's own class for ``arch``, weights in ``dtype``,
    ``bits=4`` quantized as mlx-community publishes, tied or untied embeddings; hidden 64, 2 blocks),
    built once per session and combination."""
    from lazarus.models import create_tiny_model

    root = tmp_path_factory.mktemp("zoo")
    built: dict[tuple, Path] = {}

    def zoo_dir(arch: str = "llama", dtype: str = "bfloat16", bits: int | None = None, tie: bool = True) -> Path:
        key = (arch, dtype, bits, bool(tie))
        if key not in built:
            d = root / f"{arch}-{dtype}-{'q' + str(bits) if bits else 'full'}-{'tied' if tie else 'untied'}"
            built[key] = create_tiny_model(d, arch=arch, dtype=dtype, quantize_bits=bits, tie_embeddings=tie,
                                           hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                           intermediate_size=128)
        return built[key]

    return zoo_dir


def run_cli(capsys, *args):
    """``lazarus ARGS`` in this process: (exit code, stdout, stderr); argparse's SystemExit counts too."""
    from lazarus.cli import main

    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse (help, usage errors)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err

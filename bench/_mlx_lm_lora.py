"""The optional mlx_lm_lora comparison shared by bench/dpo.py and bench/grpo.py."""

import importlib


def trainer_module(name: str):
    """``mlx_lm_lora.trainer.<name>``, or None (with a printed note) when it is not importable."""
    try:
        return importlib.import_module(f"mlx_lm_lora.trainer.{name}")
    except Exception as e:  # noqa: BLE001 - missing, or incompatible with the installed mlx-lm
        print(f"mlx_lm_lora: column skipped ({type(e).__name__}: {e}); "
              f'`pip install -e ".[bench]"` adds it.', flush=True)
        return None

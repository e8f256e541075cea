"""Small helpers shared by the metric loggers."""

from __future__ import annotations

import math


def config_dict(config) -> dict:
    """A flat ``{field: value}`` view of a pydantic config (nested models dotted)."""
    if config is None:
        return {}
    raw = config.model_dump() if hasattr(config, "model_dump") else dict(config)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)

    walk("", raw)
    return flat


def scalar_items(metrics: dict):
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield name, float(value)


def run_info_lines(info: dict) -> list[str]:
    """``state.run_info`` as the lines printed at fit start (the trainable-parameter line as mlx-lm prints it)."""
    if not info:
        return []
    trainable, total = info["trainable_parameters"], info["total_parameters"]
    lines = [f"Trainable parameters: {100 * trainable / max(total, 1):.3f}% ({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)",
             f"Precision: {info['precision']}", f"LoRA: {info['lora']}"]
    data = f"Data: {info['examples']:,} examples"
    if "tokens" in info:
        data += f", {info['tokens']:,} tokens"
    if info.get("packing"):
        data += f"; packed: {info['packing']}"
    return lines + [data]

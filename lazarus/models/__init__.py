"""Model loading (local Hugging Face / MLX folders through mlx-lm), LoRA, the tiny offline model.

``fast_cpu`` holds the CPU kernels; ``mlx_lm_patches`` every monkey-patch of mlx-lm (the kernel
swap and gradient checkpointing)."""

from lazarus.models.loading import ModelLoadError, load_model
from lazarus.models.lora import (LoRASettings, adapters_disabled, apply_lora, lora_settings, mark_lora,
                                 save_adapters)
from lazarus.models.tiny import create_tiny_model

__all__ = ["ModelLoadError", "load_model", "LoRASettings", "apply_lora", "lora_settings", "mark_lora", "save_adapters",
           "adapters_disabled", "create_tiny_model"]

"""Model loading (local Hugging Face / MLX folders through mlx-lm), LoRA, the tiny offline model."""

from lazarus.models.loading import ModelLoadError, load_model
from lazarus.models.lora import LoRASettings, adapters_disabled, apply_lora, lora_settings, save_adapters
from lazarus.models.tiny import create_tiny_model

__all__ = ["ModelLoadError", "load_model", "LoRASettings", "apply_lora", "lora_settings", "save_adapters",
           "adapters_disabled", "create_tiny_model"]

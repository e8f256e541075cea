"""Model loading (local Hugging Face / MLX folders and Lazarus run folders through mlx-lm), LoRA,
model folders out (``export``: fused adapters, sharded weights, tokenizer), reward model folders
(``reward_model``: a model folder + its scalar head), the tiny offline model.

``fast_cpu`` holds the CPU kernels; ``mlx_lm_patches`` every monkey-patch of mlx-lm (the kernel
swap and gradient checkpointing)."""

from lazarus.models.export import fuse_adapters, save_model_folder
from lazarus.models.loading import ModelLoadError, load_model, source_dir
from lazarus.models.lora import (LoRASettings, adapters_disabled, apply_lora, lora_settings, mark_lora,
                                 save_adapters)
from lazarus.models.reward_model import load_reward_model, save_reward_model
from lazarus.models.tiny import create_tiny_model

__all__ = ["ModelLoadError", "load_model", "source_dir", "LoRASettings", "apply_lora", "lora_settings", "mark_lora",
           "save_adapters", "adapters_disabled", "save_model_folder", "fuse_adapters", "create_tiny_model",
           "load_reward_model", "save_reward_model"]

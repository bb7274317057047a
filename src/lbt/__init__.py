"""lbt: latent bias transfer experiments (Hydra + PyTorch Lightning + peft LoRA)."""

from lbt.env import load_env

__version__ = "0.1.0"

# .env before any library reads its variables at import (huggingface_hub reads HF_HOME then); see lbt.env.
load_env()

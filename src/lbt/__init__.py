"""lbt: latent bias transfer experiments (Hydra + PyTorch Lightning + peft LoRA)."""

__version__ = "0.1.0"

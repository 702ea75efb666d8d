"""mobizo: fine-tune LLMs on-device with forward passes only (P-RGE + MP-LoRA, ExecuTorch)."""

__version__ = "0.1.0"

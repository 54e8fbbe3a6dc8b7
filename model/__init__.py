"""MiniMind: config, decoder, LoRA, datasets and the training plumbing shared by the train_*.py stages."""
from .LMConfig import LMConfig, preset
from .model import MiniMindLM

__all__ = ["LMConfig", "MiniMindLM", "preset"]

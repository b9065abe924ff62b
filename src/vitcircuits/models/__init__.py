"""Hooked ViT models, their configs, weight views and loaders."""
from vitcircuits.models.config import TokenLayout, ViTConfig
from vitcircuits.models.hooked_vit import HookedViT

__all__ = ["HookedViT", "TokenLayout", "ViTConfig"]

"""Converters from other implementations to :class:`~vitcircuits.models.HookedViT`, one per family.

Each converter turns the original's configuration into a :class:`~vitcircuits.models.ViTConfig`
and its state dict into HookedViT parameter names, and refuses features HookedViT does not
implement rather than approximating them.
"""


class UnsupportedModelError(ValueError):
    """The model uses a feature HookedViT does not implement."""

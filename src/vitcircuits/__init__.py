"""vitcircuits: modular attention heads, their composition, and the features they feed, in ViTs.

Notebook entry points::

    from vitcircuits import load_model
    loaded = load_model("timm/vit_base_patch32_224.augreg_in21k_ft_in1k")
    logits, cache = loaded.model.run_with_cache(images_BCHW)
"""
__version__ = "0.1.0"

from vitcircuits.models import HookedViT, TokenLayout, ViTConfig  # noqa: E402
from vitcircuits.models.loading import LoadedModel, load_model  # noqa: E402

__all__ = ["HookedViT", "LoadedModel", "TokenLayout", "ViTConfig", "__version__", "load_model"]

"""Image input pipeline: sources, safe decoding, timm-exact eval preprocessing, batching.

* :mod:`vitcircuits.data.images`: source specs (:func:`resolve_source`), :func:`open_image`
  (bad inputs raise :class:`BadImage` with a one-line reason).
* :mod:`vitcircuits.data.transforms`: :class:`PreprocessConfig` from a timm ``pretrained_cfg``.
* :mod:`vitcircuits.data.loader`: :func:`iter_batches` / :func:`make_loader`, the skip-and-warn-once
  policy (:class:`SkipLog`, logger ``vitcircuits.data``) and :class:`LoadSummary`.
"""

from vitcircuits.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIZE,
    IMAGE_EXTENSIONS,
    BadImage,
    ImageItem,
    ImageSource,
    SkippedImage,
    open_image,
    open_item,
    read_labels,
    resolve_source,
    to_rgb,
)
from vitcircuits.data.loader import (
    ImageBatch,
    ImageBatches,
    ImageDataset,
    LoadedImage,
    LoadSummary,
    SkipLog,
    collate_records,
    image_list_sha256,
    iter_batches,
    make_loader,
)
from vitcircuits.data.transforms import PreprocessConfig, make_eval_transform, preprocess_image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIZE",
    "IMAGE_EXTENSIONS",
    "BadImage",
    "ImageBatch",
    "ImageBatches",
    "ImageDataset",
    "ImageItem",
    "ImageSource",
    "LoadSummary",
    "LoadedImage",
    "PreprocessConfig",
    "SkipLog",
    "SkippedImage",
    "collate_records",
    "image_list_sha256",
    "iter_batches",
    "make_eval_transform",
    "make_loader",
    "open_image",
    "open_item",
    "preprocess_image",
    "read_labels",
    "resolve_source",
    "to_rgb",
]

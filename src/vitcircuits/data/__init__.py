"""Image input pipeline: sources, safe decoding, timm-exact eval preprocessing, batching.

* :mod:`vitcircuits.data.images`: source specs (:func:`resolve_source`), :func:`open_image`
  (bad inputs raise :class:`BadImage` with a one-line reason); ``hf:`` sources in
  :mod:`vitcircuits.data.hf`.
* :mod:`vitcircuits.data.listing`: what a folder source lists and ignores (:class:`IgnoredFiles`),
  the ImageFolder layout (:func:`folder_classes`).
* :mod:`vitcircuits.data.names`: file names are data: :func:`display_id` (the printable id shown
  and stored everywhere) and :func:`name_bytes` (what the image list hash reads).
* :mod:`vitcircuits.data.transforms`: :class:`PreprocessConfig` from a timm ``pretrained_cfg``.
* :mod:`vitcircuits.data.loader`: :func:`iter_batches` / :func:`make_loader`, the skip-and-warn-once
  policy (:class:`SkipLog`, logger ``vitcircuits.data``) and :class:`LoadSummary`.
"""

from vitcircuits.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, IMAGE_EXTENSIONS, BadImage, open_image, open_item, read_labels, resolve_source, to_rgb
from vitcircuits.data.items import ImageItem, ImageSource, SkippedImage
from vitcircuits.data.listing import IgnoredFiles, folder_classes, list_folder
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
from vitcircuits.data.names import display_id, name_bytes
from vitcircuits.data.transforms import PreprocessConfig, make_eval_transform, preprocess_image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIZE",
    "IMAGE_EXTENSIONS",
    "BadImage",
    "IgnoredFiles",
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
    "display_id",
    "folder_classes",
    "image_list_sha256",
    "iter_batches",
    "list_folder",
    "make_eval_transform",
    "make_loader",
    "name_bytes",
    "open_image",
    "open_item",
    "preprocess_image",
    "read_labels",
    "resolve_source",
    "to_rgb",
]

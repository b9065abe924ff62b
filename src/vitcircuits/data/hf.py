"""HuggingFace ``datasets`` sources (``hf:DATASET[:SPLIT]``), streamed without decoding."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vitcircuits.data.items import ImageItem, ImageSource
from vitcircuits.data.names import display_id
from vitcircuits.hub import hub_offline
from vitcircuits.sampling import reservoir


def resolve_hf(spec: str, max_images: int | None, sample_seed: int | None) -> ImageSource:
    """The :class:`ImageSource` of ``hf:DATASET[:SPLIT]`` (see ``resolve_source``).

    Labels come from an integer ``label`` column; class names from its ``ClassLabel`` names.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"source {spec!r} needs the optional 'datasets' package: pip install 'vitcircuits[datasets]'"
        ) from None
    name, _, split = spec.removeprefix("hf:").partition(":")
    if not name:
        raise ValueError(f"bad source spec {spec!r}: expected hf:DATASET[:SPLIT]")
    split = split or "train"
    if not Path(name).exists() and hub_offline():
        raise ValueError(f"source {spec!r}: the HuggingFace hub is not reachable (offline), and hf: sources stream from it; "
                         "save the images to a folder on a machine with network and pass that folder")
    stream = datasets.load_dataset(name, split=split, streaming=True)
    features = stream.features or {}
    image_columns = [col for col, feature in features.items() if isinstance(feature, datasets.Image)]
    if not image_columns:
        raise ValueError(f"source {spec!r}: no image column among features {sorted(features)}")
    column = image_columns[0]
    stream = stream.cast_column(column, datasets.Image(decode=False))
    rows = _hf_rows(stream, column, f"hf:{name}:{split}")
    if sample_seed is None:
        items = tuple(itertools.islice(rows, max_images))
    else:
        items = tuple(reservoir(rows, [max_images], sample_seed)[0])
    label_feature = features.get("label")
    classes = getattr(label_feature, "names", None) if isinstance(label_feature, datasets.ClassLabel) else None
    return ImageSource(
        spec,
        items,
        labels="dataset" if "label" in features else None,
        classes=None if classes is None else tuple(display_id(str(c)) for c in classes),
    )


def _hf_rows(stream, column: str, prefix: str) -> Iterator[ImageItem]:
    from datasets.utils.file_utils import xopen

    for row_index, row in enumerate(stream):
        encoded = row[column] or {}
        label = row.get("label")
        label = int(label) if isinstance(label, (int, np.integer)) and not isinstance(label, bool) else None
        name = f"{prefix}/{row_index}"
        ids = {"index": row_index, "id": display_id(name), "name": name, "label": label}
        if encoded.get("bytes") is not None:
            yield ImageItem(**ids, data=encoded["bytes"])
        elif encoded.get("path") and os.path.isfile(encoded["path"]):
            yield ImageItem(**ids, path=Path(encoded["path"]))
        elif encoded.get("path"):
            with xopen(encoded["path"], "rb") as handle:
                data = handle.read()
            yield ImageItem(**ids, data=data)
        else:
            yield ImageItem(**ids, data=b"")

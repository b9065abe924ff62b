"""A compositional shapes task for 32x32 ViTs with 4 px patches (an 8x8 patch grid).

Every image is a random dark background colour with bounded pixel noise and 13 *parts* drawn on
the patch grid. A part is a glyph that fills exactly one 4x4 patch, so the patch embedding sees
one whole part per token and never a piece of a neighbour:

* ``H``: a horizontal bar (pixel rows 1-2 of the patch), ``V``: a vertical bar (columns 1-2),
* ``dot``: the central 2x2 pixels,
* ``plus`` (``H`` ∪ ``V``) and ``box`` (the patch's 1-pixel outline): the *special* glyphs.

Each image has its own palette of three glyph colours (each at RGB distance ≥ 120 from the
background and ≥ 80 grey levels brighter on average, so a part's shape shows in a patch's
brightness whatever the colours: light ink on a dark page), and every part takes a random palette
colour, so colour carries no label information. Every image holds six ``H`` parts, six ``V``
parts and one *marker* part.

Classes (``CLASSES``; label = ``index % 6``, so any 6 consecutive indices are balanced):

* compositional (``COMPOSITIONAL`` = {0, 1, 2, 3}): exactly one pair of an ``H`` and a ``V`` in
  4-adjacent patches, arranged as the class says: ``H|V`` (H immediately left of V), ``V|H``,
  ``H/V`` (H immediately above V), ``V/H``. The marker is a ``dot``. The other five ``H`` and five
  ``V`` parts are placed so that no further H–V pair is 4-adjacent (diagonal contact and H–H or
  V–V contact are allowed), so the defining arrangement appears exactly once and no other class's
  arrangement appears at all. Part counts are identical across the four classes and every single
  patch looks alike across them: only the arrangement of two neighbouring patches decides, and
  with twelve bars about, knowing where the bars are is not enough without checking neighbours.
* single-patch controls (``SINGLE_PATCH`` = {4, 5}): the marker is a ``plus`` (class 4) or a
  ``box`` (class 5), which appears in exactly one patch; the six ``H`` and six ``V`` parts are
  placed with no 4-adjacent H–V pair. One patch alone decides the class.

Everything is a function of ``(seed, index)`` only (``numpy.random.default_rng([seed, index])``):
:func:`scene` gives the grid of parts, :func:`render` the uint8 image, :func:`dataset` a batch,
:func:`write_image_folder` a PNG folder with ``labels.tsv`` (the ``bundled:`` image layout), and
:func:`parse` recovers the grid of parts from a rendered image (used by the tests). For training
only, :func:`scene` has an easier variant with several copies of the class's arrangement.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitcircuits.files import write_text, write_with

IMAGE_SIZE = 32
PATCH = 4
GRID = IMAGE_SIZE // PATCH
EMPTY, H, V, DOT, PLUS, BOX = range(6)
PART_NAMES = ("empty", "H", "V", "dot", "plus", "box")
CLASSES = ("H_left_of_V", "V_left_of_H", "H_above_V", "V_above_H", "plus", "box")
COMPOSITIONAL = frozenset({0, 1, 2, 3})
SINGLE_PATCH = frozenset({4, 5})
ARRANGEMENTS = {0: (H, V, 0, 1), 1: (V, H, 0, 1), 2: (H, V, 1, 0), 3: (V, H, 1, 0)}
"""Compositional class -> (part at (r, c), part at (r + dy, c + dx), dy, dx)."""
SPECIAL = {4: PLUS, 5: BOX}
N_BARS = 6
"""``H`` parts per image, and ``V`` parts per image."""
NOISE = 12
"""Pixel noise: uniform integers in [-NOISE, NOISE] per channel, then clipped to [0, 255]."""
MIN_CONTRAST = 120.0
"""Smallest RGB (Euclidean) distance between the background and a glyph colour."""
MAX_BACKGROUND = 100
"""Background channels are uniform integers in [0, MAX_BACKGROUND]."""
MIN_BRIGHTER = 80.0
"""Smallest excess of a glyph colour's channel mean over the background's."""
N_COLOURS = 3


def _glyphs() -> np.ndarray:
    """The 4x4 boolean masks of the part types, indexed by part id."""
    masks = np.zeros((6, PATCH, PATCH), dtype=bool)
    masks[H, 1:3, :] = True
    masks[V, :, 1:3] = True
    masks[DOT, 1:3, 1:3] = True
    masks[PLUS] = masks[H] | masks[V]
    masks[BOX] = True
    masks[BOX, 1:3, 1:3] = False
    return masks


GLYPHS = _glyphs()


@dataclass(frozen=True)
class Scene:
    """One image's content before rendering."""

    parts: np.ndarray
    """``[GRID, GRID]`` int part ids (``EMPTY`` … ``BOX``)."""
    colours: np.ndarray
    """``[GRID, GRID, 3]`` uint8 glyph colour of each occupied patch."""
    background: np.ndarray
    """``[3]`` uint8 background colour."""
    label: int


def arrangement_count(parts: np.ndarray, label: int) -> int:
    """How often compositional class ``label``'s defining arrangement occurs in a part grid."""
    first, second, dy, dx = ARRANGEMENTS[label]
    a = parts[: GRID - dy, : GRID - dx] == first
    b = parts[dy:, dx:] == second
    return int((a & b).sum())


def _bar_contacts(parts: np.ndarray, r: int, c: int, part: int) -> bool:
    """Whether putting bar ``part`` at (r, c) would touch the other bar type 4-adjacently."""
    other = V if part == H else H
    return any(0 <= r + dy < GRID and 0 <= c + dx < GRID and parts[r + dy, c + dx] == other
               for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)))


def _place(parts: np.ndarray, part: int, rng: np.random.Generator) -> bool:
    """Put ``part`` on a random empty patch where it makes no H–V contact; False if none is left."""
    free = [(r, c) for r in range(GRID) for c in range(GRID)
            if parts[r, c] == EMPTY and not (part in (H, V) and _bar_contacts(parts, r, c, part))]
    if not free:
        return False
    r, c = free[rng.integers(len(free))]
    parts[r, c] = part
    return True


def _palette(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark background colour and ``N_COLOURS`` glyph colours, each ≥ MIN_CONTRAST away from it
    and ≥ MIN_BRIGHTER brighter than it (mean over channels)."""
    background = rng.integers(0, MAX_BACKGROUND + 1, 3)
    colours = []
    while len(colours) < N_COLOURS:
        colour = rng.integers(0, 256, 3)
        if np.linalg.norm(colour - background) >= MIN_CONTRAST and colour.mean() - background.mean() >= MIN_BRIGHTER:
            colours.append(colour)
    return background.astype(np.uint8), np.stack(colours).astype(np.uint8)


def _place_pair(parts: np.ndarray, first: int, second: int, dy: int, dx: int, rng: np.random.Generator) -> bool:
    """Put one more copy of an arrangement where neither part touches another bar of the other type."""
    free = [(r, c) for r in range(GRID - dy) for c in range(GRID - dx)
            if parts[r, c] == EMPTY == parts[r + dy, c + dx]
            and not _bar_contacts(parts, r, c, first) and not _bar_contacts(parts, r + dy, c + dx, second)]
    if not free:
        return False
    r, c = free[rng.integers(len(free))]
    parts[r, c], parts[r + dy, c + dx] = first, second
    return True


def scene(seed: int, index: int, n_pairs: int = 1) -> Scene:
    """The parts, colours and label of image ``index`` of the stream ``seed`` (see module docstring).

    ``n_pairs > 1`` gives an easier *training* variant: a compositional image then holds that many
    copies of its class's arrangement (still no other class's arrangement), on top of the usual
    distractors. The task itself, and every evaluation image, has ``n_pairs = 1``.
    """
    rng = np.random.default_rng([seed, index] if n_pairs == 1 else [seed, index, 0, n_pairs])
    label = index % len(CLASSES)
    while True:
        parts = np.zeros((GRID, GRID), dtype=np.int64)
        bars = [H] * N_BARS + [V] * N_BARS
        placed = True
        if label in COMPOSITIONAL:
            first, second, dy, dx = ARRANGEMENTS[label]
            r, c = int(rng.integers(GRID - dy)), int(rng.integers(GRID - dx))
            parts[r, c], parts[r + dy, c + dx] = first, second
            placed = all(_place_pair(parts, first, second, dy, dx, rng) for _ in range(n_pairs - 1))
            bars.remove(first)
            bars.remove(second)
            marker = DOT
        else:
            marker = SPECIAL[label]
        order = [bars[i] for i in rng.permutation(len(bars))] + [marker]
        if placed and all(_place(parts, part, rng) for part in order):
            break
    background, palette = _palette(rng)
    colours = palette[rng.integers(N_COLOURS, size=(GRID, GRID))]
    colours[parts == EMPTY] = 0
    return Scene(parts, colours, background, label)


def draw(s: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """The ``[32, 32, 3]`` uint8 image of a scene; pixel noise from ``rng`` (none if None)."""
    image = np.broadcast_to(s.background.astype(np.int64), (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    for r, c in zip(*np.nonzero(s.parts)):
        block = image[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH]
        block[GLYPHS[s.parts[r, c]]] = s.colours[r, c]
    if rng is not None:
        image += rng.integers(-NOISE, NOISE + 1, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def render(seed: int, index: int, n_pairs: int = 1) -> tuple[np.ndarray, int]:
    """``(image [32, 32, 3] uint8, label)`` of image ``index`` of the stream ``seed``."""
    s = scene(seed, index, n_pairs)
    return draw(s, np.random.default_rng([seed, index, 1])), s.label


def pairs_of(index: int, max_pairs: int) -> int:
    """Copies of the arrangement in image ``index`` of a training stream with ``max_pairs``: cycles
    through 1 … max_pairs every ``len(CLASSES)`` images, so every class gets every count equally."""
    return 1 + (index // len(CLASSES)) % max_pairs


def dataset(seed: int, n: int, start: int = 0, max_pairs: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``start … start + n - 1`` of stream ``seed``: ``(uint8 [n, 3, 32, 32], int64 [n])``;
    ``max_pairs > 1`` mixes in the easier training variant (:func:`pairs_of`, :func:`scene`)."""
    images, labels = zip(*(render(seed, i, pairs_of(i, max_pairs)) for i in range(start, start + n))) if n else ((), ())
    images_IHWC = np.stack(images) if n else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return torch.from_numpy(images_IHWC).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels, dtype=torch.int64)


def parse(image_HW3: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """The ``[GRID, GRID]`` part grid of a rendered image (-1 where a patch matches no glyph).

    The background is the per-channel median; a pixel is foreground when it is more than
    ``threshold`` away from it (noise moves a pixel by at most ``NOISE·√3`` ≈ 21, glyphs are ≥ 120
    away), and each patch's foreground mask is matched against the glyph masks.
    """
    image = image_HW3.astype(np.float64)
    background = np.median(image.reshape(-1, 3), axis=0)
    mask = np.linalg.norm(image - background, axis=-1) > threshold
    blocks = mask.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3)
    parts = np.full((GRID, GRID), -1, dtype=np.int64)
    for part, glyph in enumerate(GLYPHS):
        parts[(blocks == glyph).all((-1, -2))] = part
    return parts


def write_image_folder(folder: str | os.PathLike, seed: int, n: int) -> Path:
    """Write images ``0 … n-1`` of stream ``seed`` as ``{class}_{index:04d}.png`` plus ``labels.tsv``
    (header ``filename\\tindex\\tlabel``, as the bundled cifar10 set). Returns the labels path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = ["filename\tindex\tlabel"]
    for index in range(n):
        image, label = render(seed, index)
        filename = f"{CLASSES[label]}_{index:04d}.png"
        write_with(out / filename, lambda tmp, image=image: Image.fromarray(image).save(tmp, format="PNG", optimize=True))
        rows.append(f"{filename}\t{label}\t{CLASSES[label]}")
    labels_path = out / "labels.tsv"
    write_text(labels_path, "\n".join(rows) + "\n")
    return labels_path

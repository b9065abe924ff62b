"""What ``vitcircuits serve`` knows about a run: its files (read once at start) and, when it can be
loaded, the run's model and image loader for live attention (loaded once, used under a lock).

A run file that cannot be read as this tool wrote it (not JSON, JSON of the wrong shape, a bad
value, a truncated ``kernels.npz``) refuses the whole run at start with :class:`DamagedRunFolder`:
one line naming the file and the reason, never an explorer that shows part of a run as if it were
all of it. ``NaN`` and ``Infinity`` in a run's JSON are read (older runs wrote them) and served as
``null``. A model that cannot be loaded only turns live attention off, with the reason shown."""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import threading
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitcircuits.inputs import ImageOptions, ModelOptions, preprocess_config
from vitcircuits.layout import LAYOUT

log = logging.getLogger(__name__)

MAX_IMAGES = 200
"""Images listed in ``/api/run`` (the first ones of the run's image order)."""
KERNEL_RADIUS = 3
"""Offsets kept of each head's kernel: the central ``(2r+1) x (2r+1)`` window."""
MIN_IMAGE_PX = 256
"""``/api/image`` upscales (nearest neighbour, integer factor) until the longer side reaches this."""
CIRCUIT_LIMIT = 200
FEATURE_COLUMNS = ("feature", "compositional", "compositional_score", "neighbour_drop", "circuit_excess", "drop_centre", "density", "act_clean")


DAMAGE = (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError, EOFError, csv.Error, zipfile.BadZipFile)
"""What reading a damaged run file raises (``json.JSONDecodeError`` and ``UnicodeDecodeError`` are ``ValueError``)."""
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


class Unavailable(RuntimeError):
    """Live model features are not available; ``str(err)`` says why."""


class DamagedRunFolder(ValueError):
    """A run file cannot be read; ``str(err)`` is one line: the file, then the reason."""


def one_line(text: str) -> str:
    """``text`` with control characters (newlines included) escaped, so that it prints as one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _reason(err: BaseException) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte {err.start})"
    if isinstance(err, KeyError):
        return f"missing key {err.args[0]!r}" if err.args else "missing key"
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (AttributeError, TypeError, IndexError)):
        return f"unexpected content ({text})"
    return text


@contextmanager
def reading(path: Path):
    """Raise any sign of damage met while reading ``path`` as :class:`DamagedRunFolder` naming it."""
    try:
        yield
    except DamagedRunFolder:
        raise
    except DAMAGE as err:
        raise DamagedRunFolder(one_line(f"{path}: {_reason(err)}; the run folder is damaged")) from err


def read_json(path: Path, kinds: tuple[type, ...] = (dict,)) -> dict | list | None:
    """The JSON in ``path`` (None when there is no such file), which must be one of ``kinds``."""
    if not path.is_file():
        return None
    with reading(path):
        data = json.loads(path.read_bytes())
        if not isinstance(data, kinds):
            expected = " or ".join(JSON_TYPES[kind] for kind in kinds)
            raise ValueError(f"expected {expected}, got {JSON_TYPES.get(type(data), type(data).__name__)}")
    return data


def object_at(data: dict, dotted: str) -> dict:
    """``data[a][b]`` for ``dotted`` ``"a.b"`` (``{}`` where missing); ValueError if one is not an object."""
    keys = dotted.split(".")
    for i, key in enumerate(keys):
        data = data.get(key, {})
        if not isinstance(data, dict):
            raise ValueError(f"{'.'.join(keys[:i + 1])} is {JSON_TYPES.get(type(data), type(data).__name__)}, expected an object")
    return data


def _existing(root: Path, name: str) -> Path | None:
    return root / name if (root / name).exists() else None


def finite(value):
    """JSON-safe values, recursively: NaN/inf become None, numpy scalars Python ones, tuples lists."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class RunState:
    """One run folder, its summary for the page, and (optionally) its model for live attention."""

    def __init__(self, run_dir: str | Path, model: str | None = None, images: str | None = None, device: str = "auto") -> None:
        if not Path(run_dir).is_dir():
            raise FileNotFoundError(f"{run_dir}: no such run folder")
        self.root = Path(run_dir).resolve(strict=True)
        manifest = self.root / LAYOUT.manifest
        self.manifest = read_json(manifest) or {}
        with reading(manifest):
            for dotted in ("config.model", "config.images", "model.config"):
                object_at(self.manifest, dotted)
        self.lock = threading.Lock()
        self.loaded = None
        self.reason = ""
        self._load_images = None
        self.image_opts: ImageOptions | None = None
        self.own_images = images is not None
        self._image_cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        # The run's files first: a damaged run is refused before a model is loaded for it.
        atlas, predictions = self._atlas(), self._predictions()
        self.steps = self._steps()
        panels = {**(atlas or {"atlas": [], "kernels": None}), **self._composition(), "features": self._features(), "files": self._files(),
                  "steps": sorted(self.steps)}
        self._step_models: OrderedDict[int, object] = OrderedDict()
        self._open_model(model, images, device)
        self.summary = finite(self._summarise(atlas, predictions, panels))
        self.image_indices = {row["index"] for row in self.summary["images"]}

    # -- the model ---------------------------------------------------------------------------
    def _open_model(self, model: str | None, images: str | None, device: str) -> None:
        config = object_at(self.manifest, "config")
        try:
            if model is None and "model" not in config:
                raise Unavailable("the run's manifest.json records no model; pass --model")
            if images is None and "images" not in config:
                raise Unavailable("the run's manifest.json records no images; pass --images")
            model_opts = ModelOptions(**config["model"]) if "model" in config else ModelOptions(model=model)
            if model is not None and model != model_opts.model:
                model_opts = replace(model_opts, model=model, arch=None)
            model_opts = replace(model_opts, device=device)
            image_opts = ImageOptions(**config["images"]) if "images" in config else ImageOptions(images=images)
            if images is not None:
                image_opts = replace(image_opts, images=images, max_images=MAX_IMAGES)
            self.loaded = model_opts.load()
            self.loaded.model.eval()
            self._load_images = image_opts.open(self.loaded).load
            self.image_opts = image_opts
            self.pre = preprocess_config(self.loaded)
        except Exception as err:  # noqa: BLE001 - any failure only turns live attention off, with the reason shown
            self.loaded = None
            self.reason = " ".join(str(err).split()) or type(err).__name__
            log.warning("live attention unavailable: %s", self.reason)

    @property
    def live(self) -> bool:
        return self.loaded is not None

    def _require_live(self) -> None:
        if not self.live:
            raise Unavailable(f"live attention is unavailable: {self.reason}")

    def _image(self, index: int) -> torch.Tensor:
        """The preprocessed image ``[1, 3, H, W]`` (a few kept in memory); call under ``self.lock``."""
        if index not in self._image_cache:
            self._image_cache[index] = self._load_images([index])
            if len(self._image_cache) > 16:
                self._image_cache.popitem(last=False)
        self._image_cache.move_to_end(index)
        return self._image_cache[index]

    def image_png(self, index: int) -> bytes:
        """The de-normalised preprocessed image as PNG, upscaled by an integer factor (nearest neighbour)."""
        from vitcircuits.plotting.figures import denormalize

        self._require_live()
        with self.lock:
            image_1CHW = self._image(index)
        pixels = (denormalize(image_1CHW[0], self.pre.mean, self.pre.std) * 255).round().astype(np.uint8)
        height, width = pixels.shape[:2]
        scale = max(1, math.ceil(MIN_IMAGE_PX / max(height, width)))
        image = Image.fromarray(pixels).resize((width * scale, height * scale), Image.NEAREST)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    def attention(self, index: int, row: int, col: int, step: int | None = None) -> dict:
        """Every head's attention from patch ``(row, col)`` of image ``index``: ``[L][H][rows*cols]``;
        with ``step``, of that checkpoint of a dynamics run's series."""
        from vitcircuits.plotting.attention import patch_attention

        self._require_live()
        with self.lock, torch.no_grad():
            model = self.loaded.model if step is None else self._step_model(step)
            image_1CHW = self._image(index).to(model.device, model.dtype)
            maps_LHYX = patch_attention(model, image_1CHW, (row, col))
        L, H, rows, cols = maps_LHYX.shape
        return {"index": index, "row": row, "col": col, "rows": rows, "cols": cols,
                "attention": maps_LHYX.reshape(L, H, rows * cols).tolist()}

    def _step_model(self, step: int):
        """The checkpoint of ``step`` (a few kept loaded); call under ``self.lock``."""
        from vitcircuits.models.loading import load_model

        if step not in self.steps or self.steps[step] is None:
            raise Unavailable(f"step {step}: this run has no checkpoint of that step to load")
        if step not in self._step_models:
            model = self.loaded.model
            self._step_models[step] = load_model(str(self.steps[step]), device=model.device, dtype=model.dtype).model
            if len(self._step_models) > 4:
                self._step_models.popitem(last=False)
        self._step_models.move_to_end(step)
        return self._step_models[step]

    def atlas_at(self, step: int) -> dict:
        """The head atlas of one checkpoint of a dynamics run (``dynamics/steps/step_N/heads``)."""
        if step not in self.steps:
            raise Unavailable(f"step {step}: this run measured no checkpoint of that step")
        path = self.root / LAYOUT.dynamics_steps / f"step_{step:08d}" / "heads" / "atlas.json"
        with reading(path):
            return finite(self._read_atlas(path))

    def _steps(self) -> dict[int, Path | None]:
        """A dynamics run's measured steps, each with its checkpoint folder (None where the
        manifest does not list it)."""
        folder = self.root / LAYOUT.dynamics_steps
        series = self.manifest.get("series") or {}
        folders = dict(zip(series.get("steps", []), series.get("folders", [])))
        steps = {}
        for atlas in sorted(folder.glob("step_*/heads/atlas.json")) if folder.is_dir() else []:
            step = int(atlas.parent.parent.name.removeprefix("step_"))
            steps[step] = Path(folders[step]) if step in folders else None
        return steps

    # -- the run's files ---------------------------------------------------------------------
    def _summarise(self, atlas: dict | None, predictions: list[dict] | None, panels: dict) -> dict:
        model_cfg = object_at(self.manifest, "model.config")
        if self.live:
            cfg, layout = self.loaded.model.cfg, self.loaded.model.layout
            grid, n_layers, n_heads, model_id = (layout.rows, layout.cols), cfg.n_layers, cfg.n_heads, self.loaded.model_id
        else:
            layout = (atlas or {}).get("layout", {})
            grid = (layout.get("rows"), layout.get("cols"))
            n_layers, n_heads = model_cfg.get("n_layers"), model_cfg.get("n_heads")
            model_id = object_at(self.manifest, "model").get("model_id") or object_at(self.manifest, "config.model").get("model")
        return {
            "run": self.root.name, "model_id": model_id, "rows": grid[0], "cols": grid[1], "n_layers": n_layers, "n_heads": n_heads,
            "live": self.live, "reason": self.reason, "images": self._images(predictions), **panels,
        }

    def _predictions(self) -> list[dict] | None:
        """The first images of ``overview/predictions.csv`` (index, id, label, prediction); None without
        the file or with ``--images`` (the run's predictions describe the run's images only)."""
        path = self.root / LAYOUT.predictions
        if not path.is_file() or self.own_images:
            return None
        out = []
        with reading(path):
            for rec in csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8"))):
                label = int(rec["label"]) if rec.get("label") not in (None, "", "-1") else None
                pred = int(rec["prediction"]) if rec.get("prediction") not in (None, "", "None") else None
                out.append({"index": int(rec["image_index"]), "id": rec["image"], "label": label, "prediction": pred})
                if len(out) >= MAX_IMAGES:
                    break
        return out

    def _images(self, predictions: list[dict] | None) -> list[dict]:
        """The listed images with their label and prediction names: the run's predictions, else (live) the image source's first."""
        names = (self.loaded.label_names if self.live else None) or []
        name = lambda i: names[i] if i is not None and 0 <= i < len(names) else None  # noqa: E731
        if predictions is None and self.live:
            from vitcircuits.data.images import resolve_source

            source = resolve_source(self.image_opts.images, max_images=self.image_opts.max_images)
            predictions = [{"index": it.index, "id": it.id, "label": it.label, "prediction": None} for it in source.items[:MAX_IMAGES]]
        return [{**row, "label_name": name(row["label"]), "prediction_name": name(row["prediction"])} for row in predictions or []]

    def _atlas(self) -> dict | None:
        path = _existing(self.root, LAYOUT.atlas)
        return None if path is None else self._read_atlas(path)

    @staticmethod
    def _read_atlas(path: Path) -> dict:
        """An atlas (``atlas.json`` at ``path``, ``kernels.npz`` beside it) as the page draws it."""
        from vitcircuits.heads.atlas import HeadAtlas

        read_json(path)
        arrays = path.parent / "kernels.npz"
        with reading(arrays):
            if not arrays.is_file():
                raise ValueError("no such file; the head atlas writes it beside atlas.json")
            with np.load(arrays) as npz:  # decompress each array here, so that damage in it is named
                for key in npz.files:
                    npz[key]
        with reading(path):
            atlas = HeadAtlas.load(path.parent)
            grid = (atlas.layout.rows, atlas.layout.cols)
            if not all(isinstance(n, int) and n > 0 for n in grid):
                raise ValueError(f"layout: rows and cols must be positive integers, got {grid}")
            radius = max(0, min(KERNEL_RADIUS, atlas.layout.rows - 1, atlas.layout.cols - 1))
            window = atlas.window(radius)
            kernels = [[[[finite(v) for v in line] for line in window[layer, head]] for head in range(atlas.n_heads)]
                       for layer in range(atlas.n_layers)]
            rows = [{k: finite(v) for k, v in r.as_dict().items()} for r in atlas.rows]
        return {"atlas": rows, "kernels": kernels, "kernel_radius": radius,
                "layout": {"rows": atlas.layout.rows, "cols": atlas.layout.cols}}

    def _composition(self) -> dict:
        """The listed edges (supported, weak or checked exactly) with each part of their verdict,
        and the verdict counts over all edges."""
        path = _existing(self.root, LAYOUT.circuits)
        data = (read_json(path) if path else None) or {}
        with reading(path):  # without the file, data is empty and nothing below can fail
            return self._read_composition(data)

    @staticmethod
    def _read_composition(data: dict) -> dict:
        circuits, out = data.get("circuits", []), []
        for c in circuits[:CIRCUIT_LIMIT]:
            e = c.get("evidence", {})
            for key in ("senders", "sender_kinds", "receivers", "read_at"):
                if not isinstance(c.get(key) or [], list):
                    raise ValueError(f"circuit {len(out)}: {key} is {JSON_TYPES.get(type(c[key]), 'not an array')}, expected an array")
            read_at, composes = c.get("read_at") or [], e.get("composes") or {}
            where = next((w for w in ("patch", "prefix") if w in read_at), "patch")
            line, matters = composes.get(where) or {}, e.get("matters") or {}
            out.append({"senders": c.get("senders", []), "sender_kinds": c.get("sender_kinds", []), "receivers": c.get("receivers", []),
                        "kind": c.get("kind"), "verdict": c.get("verdict"), "silent": c.get("silent"), "read_at": read_at,
                        "shuffle_reading": c.get("shuffle_reading"), "composes_at": where, "composes_metric": composes.get("metric"),
                        **{f"composes_{k}": line.get(k) for k in ("effect", "lo", "hi", "null_q95")},
                        "matters_checked": bool(matters), **{f"matters_{k}": matters.get(k) for k in ("effect", "lo", "hi", "null_q95", "floor")},
                        "attribution": e.get("attribution"), "weight_z": (e.get("weights") or {}).get("z"),
                        "attention_kept": (e.get("shuffle") or {}).get("attention_kept")})
        edges = {"n": data.get("n_edges"), "verdicts": data.get("verdicts") or {}, "rule": data.get("rule"), "n_listed": len(circuits)}
        return {"circuits": out, "edges": edges}

    def _features(self) -> dict | None:
        path = _existing(self.root, LAYOUT.features_json)
        data = read_json(path) if path else None
        if not data:
            return None
        with reading(path):
            return self._read_features(data)

    def _read_features(self, data: dict) -> dict:
        figures = []
        for name, caption in data.get("figures", []):
            found = self.root / LAYOUT.sae / name  # figure paths are relative to the SAE folder
            if self._inside(found):
                figures.append({"path": found.resolve().relative_to(self.root).as_posix(), "caption": caption})
        top = [{k: finite(v) for k, v in row.items()} for row in data.get("top", [])]
        first = [k for k in FEATURE_COLUMNS if top and k in top[0]]
        columns = (first + [k for k in (top[0] if top else {}) if k not in first])[:10]
        return {"hook": data.get("hook"), "n_features_analysed": data.get("n_features_analysed"), "n_compositional": data.get("n_compositional"),
                "columns": columns, "top": top, "figures": figures}

    def _files(self) -> list[dict]:
        """Figures and outputs of the run worth linking, as run-relative paths."""
        out = [{"path": name, "caption": name} for name in (LAYOUT.report, LAYOUT.manifest) if (self.root / name).is_file()]
        for listing in (LAYOUT.overview_summary, LAYOUT.heads_figures, LAYOUT.composition_figures):
            path = self.root / listing
            data = read_json(path, (dict, list))
            with reading(path):
                figures = data.get("figures", []) if isinstance(data, dict) else data or []
                out += [{"path": p, "caption": caption} for p, caption in figures if self._inside(self.root / p)]
        return out

    def _inside(self, path: Path) -> bool:
        """Whether ``path`` is a file inside the run folder (symlinks followed)."""
        return path.is_file() and path.resolve().is_relative_to(self.root)

"""A checkpoint series packed small enough to ship in the package, and unpacked again.

A series of ~30 float16 checkpoints of the shapes organism takes ~8.5 MB, more than all the
bundled images together. Consecutive checkpoints differ little, and the last one is the bundled
float32 model, so the series is stored as a **chain of quantised differences, backwards from the
final model**: checkpoint ``g`` is the reconstruction of checkpoint ``g + 1`` plus integer codes
times a per-tensor step ``q = alpha × std(final tensor)``. The chain is closed-loop (each
difference is taken from the *reconstructed* later checkpoint), so the error of every checkpoint
is at most ``q / 2`` per weight and does not accumulate along the chain. The codes (int8, or
int16 or int32 when a tensor's codes do not fit) of each checkpoint are one safetensors file compressed
with LZMA; ``packed.json`` lists the steps, the step sizes, each checkpoint's record from training
(:mod:`vitcircuits.organisms.series`) and the sha256 of every reconstructed checkpoint, which
unpacking checks: a damaged file or a different final model fails instead of giving other weights.

Unpacking writes an ordinary series (``series.json`` and ``step_XXXXXXXX/`` folders in the timm
hub layout, float16), which every reader of a series takes.
"""
from __future__ import annotations

import hashlib
import lzma
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load, load_file, save

from vitcircuits.files import read_json, write_bytes, write_json
from vitcircuits.organisms.series import SERIES, read_series, write_checkpoint

PACKED = "packed.json"
"""The index of a packed series."""


def _state_sha256(state: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(state[name]).tobytes())
    return digest.hexdigest()


def _final_state(final_model: Path) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in load_file(str(final_model / "model.safetensors")).items()}


def pack_series(series: Path, final_model: Path, out: Path, alpha: float) -> dict:
    """Pack the series in ``series`` (its last checkpoint is the model in ``final_model``, whose
    float32 weights start the chain) into ``out``; return the index written to ``packed.json``."""
    checkpoints = read_series(series)
    final = _final_state(final_model)
    last_state = load_file(str(checkpoints[-1][1] / "model.safetensors"))
    if {k: v.astype(np.float16).tobytes() for k, v in final.items()} != {k: v.tobytes() for k, v in last_state.items()}:
        raise ValueError(f"{final_model}: its weights are not the last checkpoint of {series} (the chain starts from them)")
    step_q = {k: float(alpha * _spread(v)) for k, v in final.items()}
    entries, later = [], final
    for step, folder in reversed(checkpoints[:-1]):
        target = {k: v.astype(np.float32) for k, v in load_file(str(folder / "model.safetensors")).items()}
        codes, rebuilt = {}, {}
        for name, value in target.items():
            code = np.round((value - later[name]) / step_q[name]).astype(np.int64)
            codes[name] = code.astype(next(t for t in (np.int8, np.int16, np.int32) if np.abs(code).max(initial=0) <= np.iinfo(t).max))
            rebuilt[name] = later[name] + codes[name].astype(np.float32) * np.float32(step_q[name])
        name = f"step_{step:08d}.safetensors.xz"
        write_bytes(out / name, lzma.compress(save(codes), preset=9))
        half = {k: v.astype(np.float16) for k, v in rebuilt.items()}
        entries.append({"step": step, "file": name, "sha256": _state_sha256(half), "record": _record(folder)})
        later = rebuilt
    last_step, last_folder = checkpoints[-1]
    index = {"format": "backward quantised differences from the final model (vitcircuits.organisms.packed)", "alpha": alpha,
             "step_q": step_q, "final": {"step": last_step, "sha256": _state_sha256({k: v.astype(np.float16) for k, v in final.items()}),
                                         "record": _record(last_folder)},
             "checkpoints": entries[::-1]}
    write_json(out / PACKED, index)
    return index


def _spread(value: np.ndarray) -> float:
    """A tensor's scale for its step: the standard deviation over its entries (a LayerNorm gain
    near 1 varies by far less than its size), or its largest magnitude (1 if all zero) when constant."""
    std = float(np.std(value.astype(np.float64)))
    return std if std > 0 else max(float(np.abs(value).max(initial=0)), 1.0)


def pack_organism(organism: Path, out: Path, alpha: float) -> dict:
    """A bundled organism made of a trained organism's series: ``out`` gets its ``config.json`` and
    ``training.json``, the last checkpoint as its model (float16), and the series packed in
    ``out/checkpoints``; returns the packed index."""
    checkpoints = read_series(organism)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "training.json"):
        write_bytes(out / name, (organism / name).read_bytes())
    write_bytes(out / "model.safetensors", (checkpoints[-1][1] / "model.safetensors").read_bytes())
    return pack_series(checkpoints[-1][1].parent, out, out / SERIES, alpha)


def _record(folder: Path) -> dict:
    return {k: v for k, v in read_json(folder / "checkpoint.json").items() if k != "step"}


def unpack_series(packed: Path, final_model: Path, out: Path) -> list[tuple[int, Path]]:
    """Rebuild the series packed in ``packed`` (module docstring) as float16 checkpoints in ``out``;
    return ``(step, folder)`` in training order."""
    if not (packed / PACKED).is_file():
        raise FileNotFoundError(f"{packed}: no {PACKED} (not a packed series)")
    index = read_json(packed / PACKED)
    hub_config = read_json(final_model / "config.json")
    final = _final_state(final_model)
    half = {k: v.astype(np.float16) for k, v in final.items()}
    if _state_sha256(half) != index["final"]["sha256"]:
        raise ValueError(f"{final_model}: not the final model the series in {packed} was packed from")
    states, later = [(index["final"], half)], final
    for entry in reversed(index["checkpoints"]):
        codes = load(lzma.decompress((packed / entry["file"]).read_bytes()))
        later = {k: later[k] + codes[k].astype(np.float32) * np.float32(index["step_q"][k]) for k in later}
        half = {k: v.astype(np.float16) for k, v in later.items()}
        if _state_sha256(half) != entry["sha256"]:
            raise ValueError(f"{packed / entry['file']}: the rebuilt checkpoint does not match its sha256 (damaged file?)")
        states.append((entry, half))
    for entry, state in states:
        write_checkpoint(out, entry["step"], {k: torch.from_numpy(v) for k, v in state.items()}, hub_config, entry["record"])
    return read_series(out)

"""Save and load SAEs in the SAELens folder layout.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc``, ``b_enc``, ``W_dec``,
``b_dec`` and, for ``jumprelu``, ``threshold``). Architectures map to SAELens names as
``relu -> "standard"``, ``topk -> "topk"``, ``batchtopk -> "jumprelu"`` (a BatchTopK SAE is used at
inference as a JumpReLU with its estimated threshold). Input normalisation is always folded into the
saved weights, so ``normalize_activations`` is ``"none"``. Our own configuration is kept under the
``"vitcircuits"`` key.

Foreign SAELens folders whose maths differs from ours only by an exact re-parametrisation are
converted on load: ``apply_b_dec_to_input=false`` (``b_dec`` not subtracted before encoding) becomes
``b_enc + b_dec @ W_enc``, and a TopK SAE with ``rescale_acts_by_decoder_norm=true`` (pre-activations
multiplied by the decoder row norms, latents divided by them before decoding) gets those norms folded
into ``W_enc``, ``b_enc`` and ``W_dec``. A ``log_threshold`` tensor is read as ``threshold = exp(log_threshold)``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from vitcircuits.files import read_json
from vitcircuits.models.checkpoints import read_state_dict
from vitcircuits.sae.model import SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

TO_SAELENS = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu"}
FROM_SAELENS = {v: k for k, v in TO_SAELENS.items()}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """:func:`safetensors.torch.save_file` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sae_cfg_dict(sae: SAE) -> dict:
    """The ``cfg.json`` content for ``sae`` (assumed already folded)."""
    cfg = sae.cfg
    out = {
        "architecture": TO_SAELENS[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": str(sae.W_enc.device),
        "hook_name": cfg.hook_name,
        "hook_layer": cfg.hook_layer,
        "hook_head_index": None,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "vitcircuits": {"config": dataclasses.asdict(cfg), "normalization_folded": True},
    }
    if cfg.architecture == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False  # the folded decoder rows have norm 1 / norm_scale
        out["activation_fn_str"] = "topk"
        out["activation_fn_kwargs"] = {"k": cfg.k}
    else:
        out["activation_fn_str"] = "relu"
    return out


def save_sae(sae: SAE, folder: str | Path) -> Path:
    """Write ``sae`` to ``folder`` in the SAELens layout (normalisation folded into a copy first)."""
    folder = Path(folder)
    if float(sae.norm_scale) != 1.0:
        sae = copy.deepcopy(sae)
        sae.fold_normalization_()
    tensors = {name: getattr(sae, name) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.cfg.architecture == "batchtopk":
        tensors["threshold"] = sae.threshold
    atomic_save_safetensors(tensors, folder / WEIGHTS_FILE)
    atomic_write_bytes(folder / CFG_FILE, json.dumps(sae_cfg_dict(sae), indent=2).encode())
    return folder


def _config_from_cfg_json(raw: dict) -> SAEConfig:
    arch = raw.get("architecture", "standard")
    if arch not in FROM_SAELENS:
        raise ValueError(f"unsupported SAE architecture {arch!r} in {CFG_FILE}; supported: {sorted(FROM_SAELENS)}")
    ours = raw.get("vitcircuits", {}).get("config")
    if ours is not None:
        fields = {f.name for f in dataclasses.fields(SAEConfig)}
        cfg = SAEConfig(**{k: v for k, v in ours.items() if k in fields})
        if TO_SAELENS[cfg.architecture] != arch:
            raise ValueError(f"{CFG_FILE}: architecture {arch!r} disagrees with vitcircuits config {cfg.architecture!r}")
        if cfg.d_in != raw["d_in"] or cfg.d_sae != raw["d_sae"]:
            raise ValueError(f"{CFG_FILE}: d_in/d_sae disagree with the vitcircuits config")
        return cfg
    # A foreign SAELens SAE: k only matters for topk (and for further BatchTopK training of a jumprelu).
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    metadata = raw.get("metadata") or {}  # SAELens 6 keeps the hook there
    hook_layer = raw.get("hook_layer", metadata.get("hook_layer"))
    return SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        architecture=FROM_SAELENS[arch],
        k=int(k) if k is not None else min(SAEConfig.k, int(raw["d_sae"])),
        normalize_activations=False,
        dtype=raw.get("dtype", "float32").removeprefix("torch."),
        hook_name=raw.get("hook_name") or metadata.get("hook_name") or "",
        hook_layer=int(hook_layer) if hook_layer is not None else -1,
    )


def _to_our_parametrisation(raw: dict, cfg: SAEConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite SAELens weights so that our ``(x - b_dec) @ W_enc + b_enc`` encoder gives the same latents."""
    tensors = {name: t.double() for name, t in tensors.items()}
    if raw.get("apply_b_dec_to_input", True) is False:
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    if cfg.architecture == "topk" and raw.get("rescale_acts_by_decoder_norm", False):
        norms_F = tensors["W_dec"].norm(dim=1).clamp_min(1e-12)  # (guards all-zero rows only)
        tensors["W_enc"] = tensors["W_enc"] * norms_F
        tensors["b_enc"] = tensors["b_enc"] * norms_F
        tensors["W_dec"] = tensors["W_dec"] / norms_F[:, None]
    return tensors


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE saved by :func:`save_sae` (or a SAELens ``standard`` / ``topk`` / ``jumprelu`` SAE).

    Raises:
        FileNotFoundError: ``cfg.json`` or the weights file is missing.
        ValueError: unknown architecture, unfolded normalisation, missing tensors or shape mismatches.
    """
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
    raw = read_json(cfg_path)
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise ValueError(f"{CFG_FILE}: normalize_activations={norm!r} is not supported; only folded ('none') SAEs load")
    cfg = _config_from_cfg_json(raw)
    sae = SAE(cfg)
    tensors = read_state_dict(weights_path)
    if "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if cfg.architecture == "batchtopk":
        expected["threshold"] = (cfg.d_sae,)
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{weights_path.name}: missing tensor {name!r} (has {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{weights_path.name}: {name} has shape {tuple(tensors[name].shape)}, "
                f"expected {shape} for d_in={cfg.d_in}, d_sae={cfg.d_sae}"
            )
    tensors = _to_our_parametrisation(raw, cfg, tensors)
    with torch.no_grad():
        for name in expected:
            getattr(sae, name).copy_(tensors[name].to(cfg.torch_dtype))
        if cfg.architecture == "batchtopk":
            sae.threshold_updates.fill_(1)
    return sae.to(device).eval()

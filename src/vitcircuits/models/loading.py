"""Model loading: a name, a hub id, a folder or a weights file → a HookedViT with exact weights.

Rules:
- Every parameter comes from the checkpoint. Missing or unexpected keys are an error that
  lists them; random weights only with ``random_weights=True``.
- Hub files come through huggingface_hub, so its cache and ``HF_HUB_OFFLINE`` apply. Without
  network or cache the error names the repository and how to provide the weights.
- The family (timm or transformers) is read from the folder's ``config.json``: timm's hub layout
  has ``architecture``, transformers' has ``model_type``.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vitcircuits.hub import hub_offline
from vitcircuits.models.families import hf_vit, timm_vit
from vitcircuits.models.hooked_vit import HookedViT
from vitcircuits.runs import read_json

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class WeightsNotFoundError(RuntimeError):
    """The weights for a model id are neither cached nor downloadable."""


class StateDictMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the architecture."""


@dataclass
class LoadedModel:
    """A HookedViT with the provenance a run manifest needs."""

    model: HookedViT
    model_id: str
    family: str
    pretrained_cfg: dict
    weights_sha256: str | None
    random_weights: bool = False
    label_names: list[str] | None = None
    arch: str | None = None
    files: list[str] = field(default_factory=list)

    def manifest(self) -> dict:
        return {
            "model_id": self.model_id,
            "family": self.family,
            "arch": self.arch,
            "weights_sha256": self.weights_sha256,
            "random_weights": self.random_weights,
            "config": self.model.cfg.to_dict(),
        }


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from ``.safetensors`` or, with ``weights_only=True``, a torch pickle (never plain
    pickle). A truncated, corrupt or non-weights file raises one line naming it."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: not readable as weights ({type(err).__name__}: {reason})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StateDictMismatchError(f"{path}: not a state dict of tensors")
    return state


def hub_file(repo_id: str, filename: str) -> Path:
    """One file of a hub repository: from the HF cache if there, else downloaded. Fails within
    seconds when offline (``HF_HUB_OFFLINE=1`` or no route to the endpoint)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except LocalEntryNotFoundError as err:
        failure = err
    if not hub_offline():
        try:
            return Path(hf_hub_download(repo_id, filename, etag_timeout=5))
        except EntryNotFoundError as err:
            if not isinstance(err, LocalEntryNotFoundError):
                raise
            failure = err
        except (HfHubHTTPError, OSError, ValueError) as err:
            failure = err
    raise WeightsNotFoundError(
        f"cannot get {filename} of hub repository {repo_id!r} (offline, or not in the HF cache): {type(failure).__name__}. "
        f"Provide the weights by pre-downloading on a machine with network "
        f"(`hf download {repo_id}`, then copy its HF cache and point HF_HOME at it) "
        f"or by passing --model with a folder holding that repository's config.json and model.safetensors."
    ) from failure


def _hub_weights(repo_id: str) -> Path:
    from huggingface_hub.errors import EntryNotFoundError

    failures: list[Exception] = []
    for filename in WEIGHT_FILES:
        try:
            return hub_file(repo_id, filename)
        except (EntryNotFoundError, WeightsNotFoundError) as err:
            failures.append(err)
    offline = [f for f in failures if isinstance(f, WeightsNotFoundError)]
    if offline:
        raise offline[0]
    raise WeightsNotFoundError(f"hub repository {repo_id!r} has none of {', '.join(WEIGHT_FILES)}")


def _folder_weights(folder: Path) -> Path:
    for filename in WEIGHT_FILES:
        if (folder / filename).is_file():
            return folder / filename
    raise WeightsNotFoundError(f"{folder}: none of {', '.join(WEIGHT_FILES)} found")


def load_into(model: HookedViT, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy every parameter from ``state_dict``; any missing, unexpected or mis-shaped key is an error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or mis_shaped:
        details = []
        if missing:
            details.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            details.append(f"unexpected keys: {', '.join(unexpected)}")
        if mis_shaped:
            details.append("shape mismatch: " + ", ".join(f"{k} {list(state_dict[k].shape)} vs {list(expected[k].shape)}" for k in mis_shaped))
        raise StateDictMismatchError(f"{source}: checkpoint does not match the architecture; " + "; ".join(details))
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(state_dict[key].to(value.dtype))


def _timm_kwargs(config: dict, img_size: int | tuple | None) -> tuple[dict, dict]:
    """timm's reading of a hub ``config.json``: model kwargs and the pretrained_cfg."""
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    if "num_classes" in config:
        pretrained_cfg["num_classes"] = config["num_classes"]
    kwargs = dict(config.get("model_args") or {})
    if pretrained_cfg.get("num_classes", -1) >= 0:
        kwargs.setdefault("num_classes", pretrained_cfg["num_classes"])
    if pretrained_cfg.get("global_pool") is not None:
        kwargs.setdefault("global_pool", pretrained_cfg["global_pool"])
    if pretrained_cfg.get("fixed_input_size") and pretrained_cfg.get("input_size"):
        kwargs.setdefault("img_size", tuple(pretrained_cfg["input_size"][-2:]))
    if img_size is not None:
        kwargs["img_size"] = img_size
    for key in ("label_names", "class_groups"):
        if key in config:
            pretrained_cfg[key] = config[key]
    return kwargs, pretrained_cfg


def _source_img_size(config: dict) -> tuple[int, int] | None:
    size = (config.get("model_args") or {}).get("img_size")
    if size is None:
        input_size = (config.get("pretrained_cfg") or {}).get("input_size")
        size = input_size[-2:] if input_size else None
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else tuple(size)


def _load_timm(config: dict, weights: Path | None, model_id: str, img_size, seed: int) -> LoadedModel:
    arch = config["architecture"]
    kwargs, pretrained_cfg = _timm_kwargs(config, img_size)
    cfg = timm_vit.config_from_timm(timm_vit.build_meta(arch, **kwargs))
    model = HookedViT(cfg)
    if weights is None:
        model.init_weights(torch.Generator().manual_seed(seed))
        sha = None
    else:
        state_dict = timm_vit.convert_state_dict(read_state_dict(weights), cfg, _source_img_size(config))
        load_into(model, state_dict, str(weights))
        sha = sha256_file(weights)
    return LoadedModel(
        model=model,
        model_id=model_id,
        family="timm",
        pretrained_cfg=pretrained_cfg,
        weights_sha256=sha,
        random_weights=weights is None,
        label_names=pretrained_cfg.get("label_names"),
        arch=arch,
        files=[str(weights)] if weights else [],
    )


def _timm_config_for_arch(arch: str) -> dict:
    """A hub-style config.json for a bare timm architecture or ``arch.tag`` name."""
    try:
        pcfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError:
        pcfg = None
    if pcfg is None:
        if not timm.is_model(arch):
            raise ValueError(f"{arch!r} is neither a timm architecture, a folder, a file nor a hub id")
        pcfg_dict = {}
    else:
        pcfg_dict = pcfg.to_dict()
    return {"architecture": arch.split(".")[0], "pretrained_cfg": pcfg_dict, "hub_id": pcfg_dict.get("hf_hub_id")}


def load_model(
    spec: str,
    *,
    arch: str | None = None,
    img_size: int | tuple[int, int] | None = None,
    random_weights: bool = False,
    seed: int = 0,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
) -> LoadedModel:
    """Load a model as a HookedViT in eval mode.

    ``spec`` is one of: ``bundled:NAME`` (a model shipped in the package); a local folder in timm hub layout (``config.json`` + ``model.safetensors``)
    or transformers layout; a ``.safetensors``/``.pth`` file (needs ``arch``, a timm architecture);
    a hub id (``timm/NAME``, ``hf-hub:OWNER/NAME``, or a transformers ViT/DeiT/CLIP id); a bare timm
    name (``vit_base_patch32_224.augreg_in21k_ft_in1k``), fetched from its ``hf_hub_id``.
    ``random_weights=True`` builds the architecture with seeded random weights and reads no
    checkpoint (for a timm name or a folder's config).
    """
    loaded = _load(spec, arch, img_size, random_weights, seed)
    loaded.model.to(device=resolve_device(device), dtype=resolve_dtype(dtype)).eval()
    return loaded


def bundled_model_folder(name: str) -> Path:
    """The folder of a model shipped in the package (``bundled:NAME``)."""
    from importlib import resources

    folder = Path(str(resources.files("vitcircuits") / "assets" / "organisms" / name))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no bundled model {name!r}; bundled models: {', '.join(bundled_model_names()) or 'none'}")
    return folder


def bundled_model_names() -> list[str]:
    from importlib import resources

    root = Path(str(resources.files("vitcircuits") / "assets" / "organisms"))
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def _load(spec: str, arch: str | None, img_size, random_weights: bool, seed: int) -> LoadedModel:
    if spec.startswith("bundled:"):
        loaded = _load(str(bundled_model_folder(spec.removeprefix("bundled:"))), arch, img_size, random_weights, seed)
        loaded.model_id = spec
        return loaded
    path = Path(spec)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected timm hub or transformers layout)")
        config = read_json(config_path)
        if "architecture" in config:
            weights = None if random_weights else _folder_weights(path)
            return _load_timm(config, weights, str(path), img_size, seed)
        return hf_vit.load_hf(str(path), img_size=img_size, random_weights=random_weights, seed=seed)
    if path.is_file():
        if arch is None:
            raise ValueError(f"{path}: loading a weights file needs --arch (a timm architecture name)")
        config = _timm_config_for_arch(arch)
        return _load_timm(config, path, str(path), img_size, seed)
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin") or spec.startswith(("/", "./", "../")):
        raise FileNotFoundError(f"{spec}: no such file or folder")
    repo_id = spec.removeprefix("hf-hub:")
    if "/" not in repo_id:
        config = _timm_config_for_arch(repo_id)
        if random_weights:
            return _load_timm(config, None, repo_id, img_size, seed)
        if not config["hub_id"]:
            raise WeightsNotFoundError(f"timm has no hub weights for {repo_id!r}; pass a folder or a weights file with --arch")
        repo_id = config["hub_id"]
    config = read_json(hub_file(repo_id, "config.json"))
    if "architecture" in config:
        weights = None if random_weights else _hub_weights(repo_id)
        return _load_timm(config, weights, repo_id, img_size, seed)
    return hf_vit.load_hf(repo_id, img_size=img_size, random_weights=random_weights, seed=seed)

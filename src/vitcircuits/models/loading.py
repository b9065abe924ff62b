"""Model loading: a name, a hub id, a folder or a weights file → a HookedViT with exact weights.

Rules:
- Every parameter comes from the checkpoint. Missing or unexpected keys are an error that
  lists them; random weights only with ``random_weights=True``.
- Hub files come through huggingface_hub (:mod:`vitcircuits.models.checkpoints`), so its cache
  and ``HF_HUB_OFFLINE`` apply. Without network or cache the error names the repository and how
  to provide the weights.
- The family (timm or transformers) is read from the folder's ``config.json``: timm's hub layout
  has ``architecture``, transformers' has ``model_type``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from vitcircuits.files import read_json
from vitcircuits.models.checkpoints import (
    StateDictMismatchError,
    WeightsNotFoundError,
    folder_weights,
    hub_file,
    hub_weights,
    read_state_dict,
    sha256_file,
)
from vitcircuits.models.families import UnsupportedModelError, hf_vit, timm_vit
from vitcircuits.models.hooked_vit import HookedViT

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    blocked = config.get("neighbour_blocked_layers") or []
    if not isinstance(blocked, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in blocked):
        raise ValueError(f"{model_id}: config.json's neighbour_blocked_layers must be a list of layer indices, got {blocked!r}")
    cfg = cfg.replace(neighbour_blocked_layers=tuple(blocked))
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
            weights = None if random_weights else folder_weights(path)
            return _load_timm(config, weights, str(path), img_size, seed)
        return _load_transformers(str(path), img_size=img_size, random_weights=random_weights, seed=seed)
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
        weights = None if random_weights else hub_weights(repo_id)
        return _load_timm(config, weights, repo_id, img_size, seed)
    return _load_transformers(repo_id, img_size=img_size, random_weights=random_weights, seed=seed)


def _read_processor(spec: str) -> dict:
    """The repository's ``preprocessor_config.json``, or ``{}`` (defaults, with a warning)."""
    from huggingface_hub.errors import EntryNotFoundError

    folder = Path(spec)
    try:
        path = folder / "preprocessor_config.json" if folder.is_dir() else hub_file(spec, "preprocessor_config.json")
        return read_json(path)
    except (FileNotFoundError, EntryNotFoundError, WeightsNotFoundError):
        logger.warning("%s: no preprocessor_config.json; using ViT defaults (mean/std 0.5, bilinear resize)", spec)
        return {}


def _load_transformers(spec: str, *, img_size=None, random_weights: bool = False, seed: int = 0):
    """Load a transformers ViT/DeiT/CLIP checkpoint (folder or hub id) as a HookedViT."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"{spec} is a transformers model; install the extra: pip install 'vitcircuits[hf]'") from err

    try:
        hf_cfg = transformers.AutoConfig.from_pretrained(spec)
    except OSError as err:
        raise WeightsNotFoundError(f"cannot read the transformers config of {spec!r}: {err}") from err
    if hf_cfg.model_type not in hf_vit.CONVERTERS:
        raise UnsupportedModelError(f"{spec}: transformers model_type {hf_cfg.model_type!r} is not supported (vit, deit, clip)")
    architecture = (hf_cfg.architectures or ["AutoModel"])[0]
    model_cls = getattr(transformers, architecture, transformers.AutoModel)
    if random_weights:
        torch.manual_seed(seed)
        hf_model = model_cls(hf_cfg)
    else:
        try:
            hf_model = model_cls.from_pretrained(spec, **({"add_pooling_layer": False} if hf_cfg.model_type == "vit" and architecture == "ViTModel" else {}))
        except OSError as err:
            raise WeightsNotFoundError(f"cannot load weights of {spec!r}: {err}") from err
    cfg, state = hf_vit.convert(hf_model.float().eval(), hf_cfg.model_type, img_size)
    model = HookedViT(cfg)
    load_into(model, {k: v.detach() for k, v in state.items()}, spec)
    sha = None
    if not random_weights:
        sha = sha256_file(folder_weights(Path(spec)) if Path(spec).is_dir() else hub_weights(spec))
    return LoadedModel(
        model=model,
        model_id=spec,
        family=f"transformers:{hf_cfg.model_type}",
        pretrained_cfg=hf_vit.pretrained_cfg_from_processor(_read_processor(spec), cfg),
        weights_sha256=sha,
        random_weights=random_weights,
        label_names=[hf_cfg.id2label[i] for i in sorted(hf_cfg.id2label)] if cfg.n_classes and getattr(hf_cfg, "id2label", None) else None,
        arch=architecture,
    )

"""Checkpoint files: where a model's weights are (a folder, the HF cache or the hub), reading
them safely (safetensors, or ``torch.load(weights_only=True)``) and their sha256.

Hub files come through huggingface_hub, so its cache and ``HF_HUB_OFFLINE`` apply; offline, a
missing file fails within seconds with a message that says how to provide it. Nothing here falls
back to random weights.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vitcircuits.hub import hub_offline

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

class WeightsNotFoundError(RuntimeError):
    """The weights for a model id are neither cached nor downloadable."""


class StateDictMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the architecture."""



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


def hub_weights(repo_id: str) -> Path:
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


def folder_weights(folder: Path) -> Path:
    for filename in WEIGHT_FILES:
        if (folder / filename).is_file():
            return folder / filename
    raise WeightsNotFoundError(f"{folder}: none of {', '.join(WEIGHT_FILES)} found")

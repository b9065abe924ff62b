"""Is the HuggingFace hub usable right now? One answer for the model loader and the ``hf:`` image
source, so both fail within seconds offline instead of retrying for half a minute."""
from __future__ import annotations

import socket
from urllib.parse import urlparse


def hub_offline(timeout_s: float = 3.0) -> bool:
    """True when ``HF_HUB_OFFLINE`` is set or one TCP connect to the hub endpoint fails
    (huggingface_hub itself retries for ~25 s when offline)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
        return False
    except OSError:
        return True

"""Whether the Hugging Face hub can be asked, decided in seconds.

Offline, the hub clients retry every request with back-off before they give up: about 25 s
for a model config or a dataset, 54 s for an unknown tokenizer name. One TCP connect to
the hub's endpoint tells the same in at most PROBE_SECONDS. Callers then load from the
cache only (`local_files_only`), so a cached name still works and any other is refused at
once. With HF_HUB_OFFLINE set the clients already stay offline and nothing is probed."""
from __future__ import annotations

import functools
import os
import socket
from typing import Optional
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> Optional[str]:
    """Why the hub cannot be reached (a probe, once per process), or None when it can or
    when HF_HUB_OFFLINE already keeps the clients from trying."""
    if _offline_env():
        return None
    # The clients read HF_ENDPOINT at import; read it the same way without importing them.
    url = urlparse(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS).close()
    except OSError as err:
        return f"{url.hostname}:{port} cannot be reached ({err.strerror or err})"
    return None


def cache_only() -> bool:
    """Pass as `local_files_only`: True when asking the hub would only cost its retries."""
    return hub_unreachable() is not None


def offline_note() -> str:
    """A clause for an error message saying why the hub was not asked, if it was not."""
    reason = hub_unreachable()
    return f"; the hub was not asked: {reason}" if reason else ""

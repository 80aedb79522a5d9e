"""Reaching the Hugging Face Hub with a bound on the wait.

huggingface_hub's downloads and uploads can wait forever on a network that accepts a
connection and never answers (a stalled proxy or firewall). Before fetching or uploading,
one metadata request with a timeout (``MLX_DPO_HUB_TIMEOUT`` seconds, default 30) checks that
the Hub answers at all; any HTTP answer, even 401 or 404, counts (the real call then reports
it). Nothing is checked with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional
from ..errors import HubUnreachable

DEFAULT_TIMEOUT = 30.0


def hub_timeout() -> float:
    return float(os.environ.get("MLX_DPO_HUB_TIMEOUT", DEFAULT_TIMEOUT))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _no_answer(e: Exception) -> bool:
    """A timeout or a failed connection (httpx, requests or the standard library), not an HTTP reply."""
    names = " ".join(c.__name__ for c in type(e).__mro__)
    return isinstance(e, (TimeoutError, ConnectionError)) or "Timeout" in names or "ConnectError" in names \
        or "ConnectionError" in names


def snapshot_download(**kwargs) -> str:
    """``huggingface_hub.snapshot_download`` (a module attribute tests can replace)."""
    from huggingface_hub import snapshot_download as download

    return download(**kwargs)


def fetch(repo_id: str, repo_type: str, revision: Optional[str], allow_patterns: list) -> Path:
    """A Hub snapshot of ``repo_id`` (only ``allow_patterns``) in the normal HF cache, after
    :func:`check_reachable`; the one way models and datasets are downloaded."""
    check_reachable(repo_id, repo_type, revision)
    return Path(snapshot_download(repo_id=repo_id, repo_type=repo_type, revision=revision,
                                  allow_patterns=allow_patterns))


def check_reachable(repo_id: str, repo_type: str = "model", revision: Optional[str] = None) -> None:
    """Raise :class:`HubUnreachable` when the Hub does not answer about ``repo_id`` in time."""
    if _offline():
        return
    from huggingface_hub import HfApi

    endpoint = os.environ.get("HF_ENDPOINT") or None
    timeout = hub_timeout()
    try:
        HfApi(endpoint=endpoint).repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=timeout)
    except Exception as e:
        if not _no_answer(e):
            return  # it answered (not found, gated, unauthorised, ...): the real call says what
        where = endpoint or "https://huggingface.co"
        raise HubUnreachable(
            f"the Hugging Face Hub ({where}) could not be reached within {timeout:.0f} s "
            f"({type(e).__name__}); check the network or proxy (MLX_DPO_HUB_TIMEOUT sets the wait), or use a "
            "local path: with HF_HUB_OFFLINE=1 and a local directory nothing is fetched") from None

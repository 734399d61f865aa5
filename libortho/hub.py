"""The Hugging Face hub, asked once: when it does not answer within a few seconds this process goes offline, so
no library sits in a retry loop (an unknown id offline used to take 26-49 s to fail)."""
from __future__ import annotations

import os
import sys
import threading
from urllib.parse import urlparse

HUB_PROBE_S = 3.0

_HUB: dict = {}  # the one probe of this process: {"reason": str | None}


def _truthy(v: str | None) -> bool:
    return (v or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def go_offline() -> None:
    """Switch this process to Hugging Face offline mode, also in hub libraries imported already (they read the
    environment once, at import): no request is made, nothing retries."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        cfg = sys.modules["datasets.config"]
        cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = True


def hub_unreachable(timeout_s: float | None = None) -> str | None:
    """None when the Hugging Face hub answers, else why not (offline mode set, or no answer within `timeout_s`).

    Probes once per process (a TCP connection to the endpoint's port 443, DNS included, bounded by a thread
    join); when the hub does not answer, sets offline mode for the rest of the process (`go_offline`).
    """
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        go_offline()
        return _HUB.get("reason") or "HF_HUB_OFFLINE is set"
    if "reason" in _HUB:
        return _HUB["reason"]
    timeout_s = HUB_PROBE_S if timeout_s is None else timeout_s
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    err: list = []

    def probe():
        import socket

        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
        except OSError as e:
            err.append(e)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s)  # getaddrinfo ignores the socket timeout: the join bounds it
    if t.is_alive():
        reason = f"{host}:443 did not answer within {timeout_s:g} s"
    elif err:
        reason = f"{host}:443 unreachable ({err[0].__class__.__name__}: {err[0]})"
    else:
        reason = None
    _HUB["reason"] = reason
    if reason:
        go_offline()
    return reason

"""Reaching the Hugging Face Hub, or finding quickly that it cannot be reached: a probe with a short
timeout (name lookup included) and HF_HUB_OFFLINE honoured, so that an offline machine gets one
clear line in seconds instead of minutes of download retries. Shared by model weights, `hf:`
datasets and `kdkit push`."""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request

from kdkit.registry import KdkitError

TIMEOUT_S = 5.0


def endpoint() -> str:
    """The Hub's address: HF_ENDPOINT (read now, not at import) or huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def offline() -> bool:
    """Whether HF_HUB_OFFLINE says not to use the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def reachable(url: str, timeout: float = TIMEOUT_S) -> str | None:
    """None when `url` answers an HTTP request (any status) within `timeout` seconds, else why not.
    The request runs in a daemon thread, so that a resolver or a server that hangs cannot hold the
    caller (huggingface_hub's own client has no timeout)."""
    result: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append(None)
        except urllib.error.HTTPError:  # it answered
            result.append(None)
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            result.append(f"{type(reason).__name__}: {reason}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return result[0] if result else f"no answer within {timeout:.0f} s"



def require_hub(what: str, fix: str, timeout: float = TIMEOUT_S) -> None:
    """KdkitError in seconds when `what` needs the Hub and it cannot be reached (or HF_HUB_OFFLINE is set)."""
    if offline():
        raise KdkitError(f"{what} needs the Hugging Face Hub, and HF_HUB_OFFLINE is set: {fix}")
    why = reachable(endpoint(), timeout)
    if why is not None:
        raise KdkitError(f"{what} needs the Hugging Face Hub, which cannot be reached ({endpoint()}: {why}): {fix}")

"""`kdkit push`: upload a run's student folder (timm's layout, with its model card) to the Hugging
Face Hub.

The folder goes up as it is, through huggingface_hub's create_repo + upload_folder. timm's
`push_to_hf_hub` does not fit: it serialises a module again (timm's state dict and config), which
would drop the head strategy's kdkit_head.safetensors, the label names' order and the card.
Without a network the push fails in seconds, with one line: the endpoint is probed first with a
short timeout (the name lookup included), and HF_HUB_OFFLINE is honoured before anything is tried.
"""

from __future__ import annotations

from pathlib import Path

from kdkit.card import MARKER, write_model_card
from kdkit.models.saved import student_folder
from kdkit.network import TIMEOUT_S, endpoint, offline, reachable
from kdkit.registry import KdkitError

# files of a student folder that are never uploaded: atomic writes' temporaries, editors' and OS's files
IGNORE = [".*", "*.tmp", "__pycache__/*"]


def push(run: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         timeout: float = TIMEOUT_S) -> str:
    """Upload RUN/student (or a student folder) to the Hub repository `repo_id` ("USER/NAME"),
    created if needed (`private` then), after writing its model card (kept as it is when you wrote
    it yourself, see kdkit.card.MARKER). token: default the logged-in one (HF_TOKEN, `hf auth login`).
    Returns the commit's URL. No network, an offline setting or a refusal is one KdkitError that says
    where the folder to upload is."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = student_folder(run)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise KdkitError(f"--repo {repo_id!r} is not a Hub repository id (USER/NAME): {e}") from None
    if "/" not in repo_id:
        raise KdkitError(f"--repo {repo_id!r}: give USER/NAME (or ORG/NAME)")
    card = folder / "README.md"
    if not card.is_file() or MARKER in card.read_text(errors="replace"):
        write_model_card(folder, repo_id)
    kept = f"nothing uploaded; the folder to upload, with its model card, is {folder}"
    if offline():
        raise KdkitError(f"HF_HUB_OFFLINE is set: {kept} (unset it, or upload the folder later)")
    url = endpoint()
    why = reachable(url, timeout)
    if why:
        raise KdkitError(f"cannot reach the Hub at {url} ({why}): {kept}")
    api = HfApi(endpoint=url, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 ignore_patterns=IGNORE, commit_message=f"kdkit push of {folder.parent.name}")
    except Exception as e:  # HTTP refusals (401, 403), connection drops, bad tokens: one line, then stop
        status = getattr(getattr(e, "response", None), "status_code", None)
        login = status in (401, 403) or "Token" in type(e).__name__
        hint = " (log in with `hf auth login`, or pass --token)" if login else ""
        msg = " ".join(str(e).split())[:300]
        raise KdkitError(f"the Hub refused or dropped the upload to {repo_id}{hint}: {type(e).__name__}: {msg}; "
                         f"{kept}") from None
    return str(getattr(info, "commit_url", info))

"""Find model weights the way open_clip does (Hugging Face cache, or a local checkpoint) and fail fast.

open_clip retries an unreachable hub for most of a minute before it gives up; users deserve one clear
line instead, naming the model, the cache and the local-checkpoint escape hatch.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from retrieval.errors import ModelUnavailable


def hf_cache_dir() -> str:
    """Where huggingface_hub keeps downloaded weights (HF_HUB_CACHE / HF_HOME aware)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


@contextlib.contextmanager
def hub_offline(enabled: bool = True) -> Iterator[None]:
    """Make huggingface_hub answer from its cache only (no HEAD requests), for this block."""
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = enabled or old
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint; False when offline mode is set or the network says no."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hf_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """open_clip's 'org/repo/' or 'org/repo/file' notation -> repo id and the file names it tries."""
    repo_id, filename = os.path.split(hf_hub)
    filename = filename or "open_clip_pytorch_model.bin"
    names = []
    if filename == "open_clip_pytorch_model.bin":
        names.append("open_clip_model.safetensors")
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    names.append(filename)
    return repo_id, names


def tag_is_cached(model: str, tag: str) -> bool:
    """True when the weights for an open_clip pretrained tag are already on disk."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if cfg.get("file"):
        return Path(str(cfg["file"])).is_file()
    if cfg.get("hf_hub"):
        repo_id, names = _hf_candidates(cfg["hf_hub"])
        for name in names:
            hit = try_to_load_from_cache(repo_id, name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return True
        return False
    if cfg.get("url"):
        name = os.path.basename(urlparse(cfg["url"]).path)
        return (Path("~/.cache/clip").expanduser() / str(name)).is_file()
    return False


def check_model_name(model: str) -> None:
    """Refuse a model name open_clip does not know, pointing at the list."""
    import open_clip

    if model not in open_clip.list_models():
        raise ModelUnavailable(f"unknown model '{model}'; `python -c \"import open_clip; "
                               f"print(open_clip.list_models())\"` lists the names open_clip knows")


def check_tag(model: str, tag: str) -> None:
    """Refuse unknown model names and tags with the list of valid ones."""
    import open_clip

    check_model_name(model)
    if not open_clip.get_pretrained_cfg(model, tag):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise ModelUnavailable(
            f"'{tag}' is neither a pretrained tag of {model} nor an existing file "
            f"(tags for {model}: {tags})")


def missing_weights_message(model: str, tag: str) -> str:
    """The one line users see when weights are neither cached nor downloadable."""
    return (f"weights for {model} (pretrained '{tag}') are not in the Hugging Face cache "
            f"({hf_cache_dir()}) and the hub cannot be reached; connect once to download them, "
            f"or pass a local open_clip checkpoint with --pretrained /path/to/checkpoint.pt")


HASHES_FILE = "checkpoint-sha256.json"  # in the per-user cache (config.cache_root)
HASHES_KEPT = 64


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hash a checkpoint so the index can tell two files of one name apart.

    Remembered per user by (path, size, mtime), as an index remembers its own checkpoint's, so a new index
    of a model used before does not read its whole file again (0.5 s for ViT-B-32's 600 MB)."""
    from retrieval.fsutil import sha256_file

    try:
        st = os.stat(path)
        key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
        known = _known_hashes()
        if key in known:
            return known[key]
        sha = sha256_file(path)
    except OSError as e:
        raise ModelUnavailable(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    _remember_hash(known, key, sha)
    return sha


def _hashes_path() -> Path:
    from retrieval.config import cache_root

    return cache_root() / HASHES_FILE


def _known_hashes() -> dict[str, str]:
    try:
        got = json.loads(_hashes_path().read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in got.items()} if isinstance(got, dict) else {}


def _remember_hash(known: dict[str, str], key: str, sha: str) -> None:
    """Best effort (a read-only cache just hashes again next time); the newest HASHES_KEPT entries stay."""
    from retrieval.fsutil import atomic_write

    known.pop(key, None)
    known[key] = sha
    kept = dict(list(known.items())[-HASHES_KEPT:])
    try:
        path = _hashes_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(kept, indent=0).encode(), durable=False)
    except OSError:
        pass

"""Model names that the harness, the demo and the lmms-eval plugin accept, checked before any hub call.

A name is one of the shipped proxy models, a local folder, or a hub id. A mistyped proxy name (``proxy-nxt``)
would otherwise reach ``from_pretrained``, which spends about a minute retrying the hub before it fails;
``check_model_name`` refuses it at once and lists the proxy names.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

# name -> the geometry that evals.proxy.load reads
PROXY_MODELS = {"proxy": "llava", "proxy-next": "next", "proxy-mqt": "mqt"}


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def _cached(repo_id: str) -> bool:
    """True when the hub id has a config.json in the local hub cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id, or no huggingface_hub
        return False


def check_model_name(spec: str, what: str = "--model ") -> str:
    """What ``spec`` names: "proxy", "folder", "cached" (a hub id in the local cache) or "hub" (an ``owner/name``
    id to download, only when the hub is not switched off with HF_HUB_OFFLINE=1). Anything else raises
    ``ValueError`` at once, with the proxy names and the closest one."""
    spec = str(spec)
    if spec in PROXY_MODELS:
        return "proxy"
    if Path(spec).expanduser().exists():
        return "folder"
    if _cached(spec):
        return "cached"
    path_like = spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if not path_like and not _offline():
        return "hub"
    close = difflib.get_close_matches(spec, list(PROXY_MODELS), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    why = ("is not an existing folder" if path_like and "/" in spec
           else "is not a proxy model, an existing folder or a hub id in the local cache")
    hub = ("" if path_like else " (downloads are off: HF_HUB_OFFLINE=1)")
    raise ValueError(
        f"{what}{spec!r} {why}{hub}. Use one of the proxy models ({', '.join(PROXY_MODELS)}), a folder saved with "
        f"save_pretrained, or a hub id of a LLaVA / LLaVA-NeXT model (owner/name).{hint}")

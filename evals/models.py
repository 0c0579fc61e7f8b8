"""Model names that the harness, the demo and the lmms-eval plugin accept, checked before any hub call.

A name is one of the shipped proxy models, a local folder, or a hub id; ``HOST_CLASSES`` names the model types
the harness runs and the transformers class each loads with, ``load_processor`` / ``save_processor`` read and write
their processors (also those built without a video processor). A mistyped proxy name (``proxy-nxt``)
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
        f"save_pretrained, or a hub id of a {', '.join(HOST_NAMES.values())} model (owner/name).{hint}")


# model_type in a config.json -> the transformers class the harness (and the lmms-eval plugin) loads it with
HOST_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
HOST_NAMES = {"llava": "LLaVA", "llava_next": "LLaVA-NeXT", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL",
              "llava_onevision": "LLaVA-OneVision"}


def host_types_text() -> str:
    """'LLaVA ('llava'), LLaVA-NeXT ('llava_next'), ...': the model types the harness runs, for messages."""
    return ", ".join(f"{HOST_NAMES[t]} ({t!r})" for t in HOST_CLASSES)


def _sub_processors(processor) -> list[str]:
    return list(type(processor).get_attributes())


def save_processor(processor, folder) -> None:
    """``processor.save_pretrained(folder)``, also for a processor built without one of its sub-processors.

    The tiny hosts of ``vlprune.hosts_tiny`` are built with ``video_processor=None`` (transformers' video processors
    need torchvision), and transformers 5.25's ``ProcessorMixin.save_pretrained`` then fails reading the missing
    sub-processor's ``_auto_class``. The missing one is left out of that one call: the folder gets what
    ``save_pretrained`` writes for the others (tokenizer files, ``processor_config.json`` with the image processor
    and ``"video_processor": null``, ``chat_template.jinja``); ``load_processor`` reads it back."""
    present = [a for a in _sub_processors(processor) if getattr(processor, a, None) is not None]
    if len(present) == len(_sub_processors(processor)):
        processor.save_pretrained(folder)
        return
    processor.get_attributes = lambda: present       # read by save_pretrained through the instance
    try:
        processor.save_pretrained(folder)
    finally:
        del processor.get_attributes


def load_processor(spec: str):
    """``AutoProcessor.from_pretrained(spec)``; where that fails for a processor that takes a video processor
    (torchvision missing, or a folder saved without one by ``save_processor``), the same processor class built from
    the folder's tokenizer, image processor and processor settings (chat template included) without a video
    processor: images and text work as usual, videos are not supported. The original error is raised when that
    fails too."""
    import inspect

    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    try:
        return AutoProcessor.from_pretrained(spec)
    except (OSError, ImportError, ValueError, AttributeError) as first:
        error = first
    try:
        settings, _ = ProcessorMixin.get_processor_dict(spec)
        cls = getattr(transformers, str(settings.get("processor_class")), None)
        if cls is None or "video_processor" not in cls.get_attributes():
            raise error
        from vlprune.hosts_tiny import _without_video_processor

        init = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in settings.items() if k in init and k not in cls.get_attributes()}
        return _without_video_processor(cls, image_processor=AutoImageProcessor.from_pretrained(spec),
                                        tokenizer=AutoTokenizer.from_pretrained(spec), **kwargs)
    except Exception:
        raise error from None

"""vlprune as an lmms-eval model: ``lmms-eval --model vlprune --model_args pretrained=...,method=hired,keep_ratio=0.2``.

lmms-eval finds the model through the ``lmms_eval.models`` entry point that vlprune's ``pyproject.toml`` declares
(``manifest`` below), or, for lmms-eval versions before entry points, through ``LMMS_EVAL_PLUGINS=vlprune_lmms_eval``
(``vlprune_lmms_eval.models.AVAILABLE_MODELS``). Nothing in lmms-eval is patched or copied.

``python -m vlprune_lmms_eval.export`` writes a benchmark of vlprune's harness (the proxy benchmark, or a JSONL file
of image / question / answer) as a local lmms-eval task folder, for ``--include_path``.
"""
from __future__ import annotations

MODEL_ID = "vlprune"
CLASS_PATH = "vlprune_lmms_eval.models.vlprune.VlpruneModel"


def manifest():
    """The lmms-eval model manifest (lmms-eval 0.5 and newer load it from the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)

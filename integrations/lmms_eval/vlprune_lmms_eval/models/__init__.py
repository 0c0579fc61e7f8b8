"""Model table for lmms-eval's ``LMMS_EVAL_PLUGINS`` mechanism: ``{module name: class name}``."""

AVAILABLE_MODELS = {"vlprune": "VlpruneModel"}

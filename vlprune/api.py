"""The public API: apply, remove, pruned, stats."""
from __future__ import annotations

import contextlib

from .adapters import find_adapter
from .methods.base import Compose, Method
from .registry import get_method
from .state import ATTR, PruneState


def _as_method(method, kwargs) -> Method:
    if isinstance(method, (list, tuple)):
        if kwargs:
            raise ValueError(
                f"keyword arguments {sorted(kwargs)} are ambiguous for a list of methods; pass instances, e.g. "
                f"[vlprune.get_method('pool', keep=144), vlprune.get_method('fastv', k=2, keep=64)]"
            )
        return Compose([_as_method(m, {}) for m in method])
    if isinstance(method, Method):
        if kwargs:
            raise ValueError(
                f"keyword arguments {sorted(kwargs)} were given with a method instance {method.label}; set them on "
                f"the instance or pass the method by name"
            )
        return method
    if isinstance(method, str):
        return get_method(method, **kwargs)  # unknown hyperparameters: ValueError listing the allowed ones
    raise ValueError(
        f"method must be a registered name, a Method instance or a list of them; got {type(method).__name__}: {method!r}"
    )


def apply(model, method, **kwargs):
    """Attach a compression method to ``model`` in place and return the model.

    ``method`` is a registered name (``vlprune.list_methods()``) with its hyperparameters as keywords, a Method
    instance, or a list of them (a composition). A second ``apply`` replaces the first.

    Returns ``model`` itself (the same object, patched), so calls chain:
    ``vlprune.apply(model, "pool", keep=64).generate(**inputs)``. In a notebook, a cell ending with a bare
    ``vlprune.apply(...)`` therefore prints the whole model; end it with ``;`` or assign the result.

    >>> model = vlprune.apply(model, "fastv", k=2, keep=64)        # doctest: +SKIP
    """
    m = _as_method(method, kwargs)
    adapter = find_adapter(model)
    if getattr(model, ATTR, None) is not None:
        remove(model)
    state = PruneState(m, adapter)
    try:
        adapter.attach(state)
    except Exception:
        _detach(state)
        raise
    setattr(model, ATTR, state)
    return model


def _detach(state: PruneState) -> None:
    for h in state.handles:
        h.remove()
    state.handles.clear()
    for undo in reversed(state.restore):
        undo()
    state.restore.clear()


def remove(model):
    """Take vlprune off ``model``: every hook, swapped module and attribute. Returns the model."""
    state = getattr(model, ATTR, None)
    if state is None:
        return model
    _detach(state)
    delattr(model, ATTR)
    return model


@contextlib.contextmanager
def pruned(model, method, **kwargs):
    """Context manager: ``with vlprune.pruned(model, "pool", keep=64): model.generate(...)``.

    Restores the previous state on exit (no method, or the method that was applied before).
    """
    previous = getattr(model, ATTR, None)
    prev_method = previous.method if previous is not None else None
    apply(model, method, **kwargs)
    try:
        yield model
    finally:
        remove(model)
        if prev_method is not None:
            apply(model, prev_method)


def is_applied(model) -> bool:
    return getattr(model, ATTR, None) is not None


def _official_equivalent(per_sample_visual: list, images: list) -> list[float]:
    """Per sample: sum over layers of the visual tokens leaving each layer (what enters the next; the last layer
    keeps what entered it) / layers / the sample's image views (base image and crops)."""
    views = [0] * len(per_sample_visual)
    for im in images:
        if 0 <= im["sample"] < len(views):
            views[im["sample"]] += sum(1 for k in im["partitions"] if k not in ("newline", "cls"))
    return [(sum(v[1:]) + v[-1]) / len(v) / max(1, views[i]) for i, v in enumerate(per_sample_visual)]


def stats(model) -> dict:
    """What the last call (a forward, or a generate with its decoding steps) actually ran, and its cost.

    Keys: ``method``; ``images`` (per image: sample, visual_tokens, kept, kept_indices, ``partitions`` and
    ``kept_per_partition``: tokens per source before and after the PRE_LLM stage, e.g. {"base": 576, "crop1": 576,
    ..., "newline": 48}; ``kept_per_partition`` is None when the method merged tokens); per sample
    ``tokens_per_layer`` and ``visual_per_layer`` (prefill, per decoder layer), ``equivalent_tokens`` (mean visual
    tokens entering each layer), ``equivalent_tokens_official`` (the count the MustDrop / SparseVLM codes print: the
    visual tokens each layer leaves, a pruning layer counted after its pruning, averaged over the layers and divided
    by the sample's image views, 1 per LLaVA-1.5 image, base + crops per AnyRes image), ``kept_positions`` (prompt positions of the visual tokens that reached the last layer);
    ``visual_positions`` ({decoder layer: per sample prompt positions of the visual tokens entering it}, for layer 0
    and every layer where the set changes);
    ``reports`` (what methods reported, e.g. ToDRE's attention shares); ``method_seconds`` (wall time of the method's own work: ViT score capture, selection, pruning decisions,
    eviction; on a GPU, launch time unless synchronised); ``schedule`` (vlprune.cost.Schedule) and ``cost`` (vlprune.cost.CostReport of that schedule).
    """
    from . import cost

    state = getattr(model, ATTR, None)
    if state is None:
        raise ValueError("vlprune.stats: no method is applied to this model; call vlprune.apply(model, ...) first")
    run = state.run
    visual_pl = run.visual_per_layer or []
    per_sample_visual = [list(x) for x in zip(*visual_pl)] if visual_pl else []
    per_sample_tokens = [list(x) for x in zip(*(run.tokens_per_layer or []))] if run.tokens_per_layer else []
    mean_visual = [sum(v) / len(v) for v in visual_pl] if visual_pl else []
    schedule = cost.Schedule(vision=list(run.vision), projector_rows=run.projector_rows,
                             projector_flops=run.projector_extra_flops, llm=list(run.llm),
                             scoring_flops=run.scoring_flops, visual_per_layer=mean_visual)
    report = cost.schedule_cost(getattr(state.adapter, "cost_config", model.config), schedule) if run.llm else None
    return {
        "method": state.method.label,
        "images": [dict(i) for i in run.images],
        "tokens_per_layer": per_sample_tokens,
        "visual_per_layer": per_sample_visual,
        "equivalent_tokens": [sum(v) / len(v) for v in per_sample_visual],
        "equivalent_tokens_official": _official_equivalent(per_sample_visual, run.images),
        "kept_positions": run.kept_positions,
        "visual_positions": dict(run.visual_positions or {}),
        "evicted": dict(run.evicted),
        "notes": list(run.notes),
        "method_seconds": run.method_seconds,
        "reports": dict(run.reports),
        "schedule": schedule,
        "cost": report,
    }

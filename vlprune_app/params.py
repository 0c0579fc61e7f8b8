"""Method hyperparameters read from the registry and the method dataclasses, and the budget of a request.

Nothing here is hard-coded per method: ``method_specs()`` walks ``vlprune.list_methods()`` and each class's
dataclass fields (fields with defaults are the paper's hyperparameters), so a method registered later gets its
widgets and its validation by itself.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

BUDGET_FIELDS = ("keep", "keep_ratio")
_SKIP = {"budget"}  # the Budget object itself: set through keep / keep_ratio


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a method: its name, widget kind, default and whether None is allowed."""

    name: str
    kind: str  # "bool" | "int" | "float" | "str" | "tuple"
    default: object
    optional: bool
    type_text: str

    def parse(self, value, method: str):
        """A widget's (or a JSON) value as the type the dataclass expects; None means "the default"."""
        if value is None or (isinstance(value, str) and not value.strip() and self.kind != "str"):
            return None if self.optional else self.default
        if isinstance(value, float) and math.isnan(value):
            return None if self.optional else self.default
        try:
            if self.kind == "bool":
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("true", "false", "1", "0"):
                        raise ValueError
                    return low in ("true", "1")
                return bool(value)
            if self.kind == "int":
                f = float(value)
                if f != int(f):
                    raise ValueError
                return int(f)
            if self.kind == "float":
                return float(value)
            if self.kind == "tuple":
                items = value if isinstance(value, (list, tuple)) else [
                    v for v in str(value).replace("(", "").replace(")", "").split(",") if v.strip()]
                out = []
                for v in items:
                    f = float(v)
                    out.append(int(f) if f == int(f) and "." not in str(v) else f)
                return tuple(out)
            text = str(value).strip()
            return None if (self.optional and text.lower() in ("", "none")) else text
        except (TypeError, ValueError):
            raise ValueError(
                f"{method}: {self.name}={value!r} is not a valid {self.type_text}"
                f"{' (or empty for None)' if self.optional else ''}; the default is {self.default!r}"
            ) from None

    @property
    def widget(self) -> str:
        """"checkbox", "number" or "text": numbers that may be None are text (empty = None), since a number field
        cannot show None."""
        if self.kind == "bool":
            return "checkbox"
        if self.kind in ("int", "float") and not self.optional:
            return "number"
        return "text"

    def widget_value(self):
        """The default as its widget shows it (tuples as comma-separated text, None as empty text)."""
        if self.kind == "tuple":
            return "" if self.default is None else ", ".join(str(v) for v in self.default)
        if self.widget == "text":
            return "" if self.default is None else str(self.default)
        return self.default


@dataclass(frozen=True)
class MethodSpec:
    name: str
    class_name: str
    summary: str
    stages: str
    params: tuple[Param, ...]

    @property
    def has_budget(self) -> bool:
        return any(p.name in BUDGET_FIELDS for p in self.params)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        allowed = ", ".join(p.name for p in self.params) or "none"
        raise ValueError(f"{self.name} has no hyperparameter {name!r}; allowed: {allowed}")


def _kind(f: dataclasses.Field) -> tuple[str, bool, str]:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = str(t).replace("typing.", "")
    default = f.default if f.default is not dataclasses.MISSING else None
    optional = "None" in t or "Optional" in t or default is None
    base = t.replace("Optional[", "").replace("]", "").replace("| None", "").replace("None |", "").strip()
    if isinstance(default, bool) or base == "bool":
        kind = "bool"
    elif isinstance(default, (tuple, list)) or base.startswith(("tuple", "list", "Sequence")):
        kind = "tuple"
    elif isinstance(default, int) or base == "int":
        kind = "int"
    elif isinstance(default, float) or base == "float":
        kind = "float"
    else:
        kind = "str"
    return kind, optional, t


def method_specs() -> dict[str, MethodSpec]:
    """Every registered method with its hyperparameters (name, widget kind, default), in registry order."""
    import vlprune
    from vlprune.registry import get_method_class

    specs = {}
    for name in vlprune.list_methods():
        cls = get_method_class(name)
        params = []
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                if not f.init or not f.repr or f.name in _SKIP or f.name.startswith("_"):
                    continue
                if f.default is not dataclasses.MISSING:
                    default = f.default
                elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                    default = f.default_factory()  # type: ignore[misc]
                else:
                    default = None
                kind, optional, text = _kind(f)
                params.append(Param(f.name, kind, default, optional, text))
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        specs[name] = MethodSpec(name, cls.__name__, doc, _stages(cls), tuple(params))
    return specs


def _stages(cls) -> str:
    """The stages a method acts at, as text; composite methods (stages as a property) are instantiated to ask."""
    stages = getattr(cls, "stages", ())
    if isinstance(stages, property):
        stages = None
        for kw in ({}, {"keep": 64}):
            try:
                stages = cls(**kw).stages
                break
            except Exception:
                continue
        if stages is None:
            return "composite"
    try:
        return ", ".join(str(getattr(s, "value", s)) for s in stages)
    except TypeError:
        return "composite"


def parse_budget(budget) -> dict:
    """The request's budget: an integer >= 1 keeps that many visual tokens, a number in (0, 1) keeps that share."""
    if budget is None or (isinstance(budget, str) and not budget.strip()):
        raise ValueError("budget is empty; give a number of visual tokens to keep (e.g. 64) or a share in (0, 1) "
                         "(e.g. 0.25)")
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number of tokens (e.g. 64) or a share in (0, 1) (e.g. 0.25); "
                         f"got {budget!r}") from None
    if math.isnan(b) or b <= 0:
        raise ValueError(f"budget must be > 0: a number of tokens (e.g. 64) or a share in (0, 1); got {budget!r}")
    if b < 1:
        return {"keep_ratio": b}
    if b != int(b):
        raise ValueError(f"budget {budget!r} is above 1 but not a whole number of tokens; give a whole number of "
                         f"tokens (e.g. {math.floor(b)} or {math.ceil(b)}) or a share below 1 (e.g. 0.25)")
    return {"keep": int(b)}


def parse_overrides(text, specs: dict[str, MethodSpec]) -> dict[str, dict]:
    """``{"fastv": {"k": 3}, ...}`` (JSON text or a dict) checked against the registry and parsed per field."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    if isinstance(text, str):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"hyperparameters must be JSON like {{\"fastv\": {{\"k\": 3}}}}; {e.msg} at character "
                             f"{e.pos} of {text[:80]!r}") from None
    else:
        raw = text
    if not isinstance(raw, dict):
        raise ValueError(f"hyperparameters must be a JSON object keyed by method name, e.g. "
                         f"{{\"fastv\": {{\"k\": 3}}}}; got {type(raw).__name__}")
    out: dict[str, dict] = {}
    for name, fields in raw.items():
        if name not in specs:
            raise ValueError(f"hyperparameters for unknown method {name!r}; registered: {', '.join(specs)}")
        if not isinstance(fields, dict):
            raise ValueError(f"hyperparameters of {name} must be an object of field: value; got {fields!r}")
        spec = specs[name]
        out[name] = {k: spec.param(k).parse(v, name) for k, v in fields.items()}
    return out


def method_kwargs(name: str, spec: MethodSpec, budget: dict, overrides: dict) -> dict:
    """Keyword arguments for ``vlprune.get_method(name, ...)``: the request's budget (unless the method's own
    keep / keep_ratio is set), then the changed hyperparameters."""
    own = overrides.get(name, {})
    kw: dict = {}
    if spec.has_budget and not any(own.get(f) is not None for f in BUDGET_FIELDS):
        kw.update({k: v for k, v in budget.items() if any(p.name == k for p in spec.params)})
    for k, v in own.items():
        if k in BUDGET_FIELDS and v is None:
            continue
        kw[k] = v
    return kw


def changed_values(spec: MethodSpec, values) -> dict:
    """Widget values of one method that differ from the defaults (the overrides sent with a request)."""
    out = {}
    for p, v in zip(spec.params, values):
        parsed = p.parse(v, spec.name)
        default = p.default
        if p.kind == "tuple" and default is not None:
            default = tuple(default)
        if parsed != default:
            out[p.name] = list(parsed) if isinstance(parsed, tuple) else parsed
    return out

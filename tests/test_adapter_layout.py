"""Adapters describe one host each on vlprune.engine: none subclasses another host's adapter, each file stays short."""
from pathlib import Path

import vlprune.adapters.base as adapters_base
from vlprune.adapters.base import find_adapter  # noqa: F401

ADAPTERS_DIR = Path(adapters_base.__file__).parent
MAX_LINES = 300


def _registered():
    from vlprune.adapters import (hf_llava, hf_onevision, hf_qwen_vl, llava_repo,  # noqa: F401  (registers the
                                  vision_towers)  # built-in adapters)

    return list(adapters_base._ADAPTERS)


def test_no_adapter_subclasses_another_hosts_adapter():
    adapters = _registered()
    assert len(adapters) >= 6
    for cls in adapters:
        others = [c.__name__ for c in cls.__mro__[1:] if c in adapters]
        assert not others, f"{cls.__name__} subclasses the adapter(s) of another host: {others}"


def test_adapter_files_stay_short():
    for path in sorted(ADAPTERS_DIR.glob("*.py")):
        n = len(path.read_text().splitlines())
        assert n < MAX_LINES, f"{path.name} has {n} lines; an adapter describes its host in under {MAX_LINES}"

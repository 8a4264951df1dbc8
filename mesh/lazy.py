"""Lazy package exports (PEP 562): a package names its public API without importing the modules behind it.

Why: some packages must stay cheap to import. `hivemesh.mesh.audit.handshake.switch` has to run before gRPC
loads (gRPC reads its tracer setting once, then), and the plain validator (`python -m
hivemesh.agents.validate_plain`) runs with no hivemesh runtime in the process. This module imports nothing
but the standard library.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str], namespace: MutableMapping[str, Any], public: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package's `__getattr__` and `__dir__`: name -> module that defines it, imported on first use and
    then kept in the package's namespace (so the lookup happens once)."""

    def getattr_(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted([*namespace, *public])

    return getattr_, dir_

"""What a run executes: a pattern object or an async function `(run, input)`, recorded as an import reference
(`module:attr`) so any process with the code can resume the run."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from hivemesh.mesh.errors import FailedPreconditionError, InvalidInputError

Body = Callable[[Any, Any], Awaitable[Any]]


def definition_ref(definition: Any) -> str:
    """The import reference recorded for a definition ('' when it has none: resumable only in-process)."""
    if isinstance(definition, str):
        return definition
    ref = getattr(definition, "ref", "")
    if isinstance(ref, str) and ref:
        return ref
    module, qualname = getattr(definition, "__module__", ""), getattr(definition, "__qualname__", "")
    if inspect.isfunction(definition) and module and qualname and "<locals>" not in qualname:
        return f"{module}:{qualname}"
    return ""


def resolve_definition(ref: str) -> Any:
    """Import 'package.module:attr' (a pattern object or an async function (run, input))."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise InvalidInputError(f"workflow definition {ref!r} must be 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise FailedPreconditionError(f"cannot import {module!r} for workflow definition {ref!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FailedPreconditionError(f"workflow definition {ref!r}: {module} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def body_of(definition: Any) -> Body:
    if hasattr(definition, "run") and callable(definition.run):
        return definition.run  # type: ignore[no-any-return]
    if callable(definition):
        return definition  # type: ignore[no-any-return]
    raise InvalidInputError(f"a workflow definition is a pattern or an async function, not {type(definition).__name__}")

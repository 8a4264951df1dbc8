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


def _is_async(fn: Any) -> bool:
    """A callable fn is an async function, bound method or partial of one, or an object whose __call__ is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def body_of(definition: Any) -> Body:
    """What a run awaits: a pattern's async `run`, or an async function (run, input). Anything else is refused
    InvalidInputError: a sync function's result cannot be awaited, so its run would start and never end."""
    accepted = "a pattern object (with an async run(runner, input)) or an async function (run, input)"
    run = getattr(definition, "run", None)
    if callable(run):
        if _is_async(run):
            return run  # type: ignore[no-any-return]
        raise InvalidInputError(f"workflow definition {_named(definition)!r}: its run is not async; a workflow "
                                f"definition is {accepted}", field_violations={"definition": f"must be {accepted}"})
    if callable(definition):
        if _is_async(definition):
            return definition  # type: ignore[no-any-return]
        raise InvalidInputError(f"workflow definition {_named(definition)!r} is not async (declare it async def); a "
                                f"workflow definition is {accepted}",
                                field_violations={"definition": f"must be {accepted}"})
    raise InvalidInputError(f"a workflow definition is {accepted}, not {type(definition).__name__}",
                            field_violations={"definition": f"must be {accepted}"})


def _named(definition: Any) -> str:
    return definition_ref(definition) or getattr(definition, "__qualname__", "") or type(definition).__name__

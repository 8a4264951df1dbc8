"""Input guard: the capability exists here, the payload is within its size limit, and it is JSON matching
the capability's input schema. Runs after authentication so strangers learn nothing about an agent's inputs."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hivemesh.mesh import json_fast
from hivemesh.mesh.errors import (
    ContentRefusedError,
    InvalidInputError,
    PayloadTooLargeError,
    UnknownCapabilityError,
)
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.layers.screen import ContentScreen
from hivemesh.mesh.schema import CompiledSchema, SchemaMismatchError, compile_schema
from hivemesh.v1 import agent_pb2

JSON = "application/json"
DEFAULT_MAX_INPUT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Capability:
    schema: CompiledSchema | None
    """The compiled input schema (None: any JSON)."""
    modes: frozenset[str]
    """Accepted input content types."""
    limit: int
    """Input size limit in bytes."""


class InputGuardLayer:
    """Refuses unknown capabilities, oversized payloads, malformed JSON, schema violations and (with a content
    screen) text fields carrying prompt-injection patterns. Nothing refused reaches the agent.

    limits: per-capability size limits in bytes (others get max_input_bytes). screen: the content screen
    (None: none); screen_exempt: capabilities it skips (say, one whose job is to analyse such text).
    """

    name = "input-guard"

    def __init__(
        self,
        capabilities: Iterable[agent_pb2.Capability],
        *,
        max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
        agent_name: str = "",
        limits: Mapping[str, int] | None = None,
        screen: ContentScreen | None = None,
        screen_exempt: Iterable[str] = (),
    ) -> None:
        if max_input_bytes <= 0:
            raise ValueError("max_input_bytes must be positive")
        self._max = max_input_bytes
        self._agent = agent_name
        self._limits: dict[str, int] = {}
        self._screen = screen
        prepare = getattr(screen, "prepare", None)  # a screen that compiles its rules does it now, not in a call
        if callable(prepare):
            prepare()
        self._exempt = frozenset(screen_exempt)
        for name, limit in (limits or {}).items():
            if not isinstance(limit, int) or limit <= 0:
                raise ValueError(f"the input limit of capability {name!r} must be a positive number of bytes")
            self._limits[name] = limit
        self._capabilities: dict[str, _Capability] = {
            cap.name: _Capability(
                schema=compile_schema(cap.input_schema, where=f"capability {cap.name} input"),
                modes=frozenset(cap.input_modes or (JSON,)),
                limit=self._limits.get(cap.name, max_input_bytes),
            )
            for cap in capabilities
        }
        """What is checked per capability, found with one lookup per call (the only "does it exist" check)."""

    def limit_of(self, capability: str) -> int:
        return self._limits.get(capability, self._max)

    def check(self, call: Inbound) -> None:
        req = call.request
        if req is None:
            return
        name = req.capability
        cap = self._capabilities.get(name)
        if cap is None:
            raise UnknownCapabilityError(
                f"agent {self._agent or '(this agent)'} has no capability {name!r}",
                metadata={"capability": name[:128]},
            )
        data = call.input  # not req.input: a large payload is a view of the bytes received, unset in the message
        size = len(data)
        limit = cap.limit
        if size > limit:
            raise PayloadTooLargeError(
                f"input of {size} bytes is over the {limit}-byte limit of capability {name!r}",
                metadata={"limit_bytes": str(limit), "size_bytes": str(size)},
            )
        ctype = req.content_type or JSON
        if ctype not in cap.modes:
            raise InvalidInputError(
                f"capability {name!r} accepts {sorted(cap.modes)}, not {ctype!r}",
                field_violations={"content_type": "unsupported content type"},
            )
        if ctype != JSON:
            return
        try:
            value = json_fast.loads(data) if data else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInputError(
                f"input is not valid JSON: {exc}", field_violations={"input": str(exc)}
            ) from None
        except RecursionError:
            msg = "input JSON is nested too deeply"
            raise InvalidInputError(msg, field_violations={"input": msg}) from None
        if cap.schema is not None:
            try:
                cap.schema.check(value)
            except SchemaMismatchError as bad:
                raise InvalidInputError(
                    f"input does not match the schema of {name!r}: {bad}", field_violations=bad.violations,
                ) from None
        if self._screen is not None and name not in self._exempt:
            found = self._screen.screen(name, value)
            if found is not None:
                raise ContentRefusedError(
                    f"input field {found.path} of {name!r} was refused by the content screen ({found.rule})",
                    field_violations={found.path: f"matches the content rule {found.rule!r}"},
                    metadata={"rule": found.rule},
                )
        call.parsed_input = value
        call.input_parsed = True

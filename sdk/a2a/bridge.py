"""The other way: an external A2A agent, known by its card URL, served on the mesh as an SDK agent.

`A2ABridgeAgent.from_card(card, http)` makes an `Agent` whose capabilities are the card's skills; served by
`AgentServer` it registers in the registry and receives calls through the mesh's whole inbound chain (mutual
TLS, token, authz, rate limits, budgets, audit) like any agent, then forwards each call to the A2A agent with
a2a-sdk's client (`SendMessage`, the skill named in the message metadata as `skill`).

Input: a string, or an object holding only `text`, goes as a text part; anything else as a data part. Output:
the completed task's (or the direct message's) first data part, else its text. An A2A task that ends FAILED or
REJECTED is an AgentError with the agent's words; INPUT_REQUIRED is an `InputRequired` escalation (the
conversation is not continued by the bridge: a person answers by calling again).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Final

import httpx
from a2a.client import Client, ClientConfig, create_client
from a2a.client.card_resolver import parse_agent_card
from a2a.client.errors import A2AClientTimeoutError
from a2a.helpers import get_data_parts, get_text_parts, new_data_part, new_text_part
from a2a.types import AgentCard, Message, Part, Role, SendMessageRequest, TaskState
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH
from a2a.utils.errors import A2AError, InvalidParamsError
from google.protobuf import json_format, struct_pb2
from google.protobuf.json_format import ParseDict

from hivemesh.mesh.errors import (
    AgentError,
    AgentUnavailableError,
    DeadlineExceededError,
    HivemeshError,
    InvalidInputError,
)
from hivemesh.sdk.a2a.executor import _ints
from hivemesh.sdk.agent import Agent, CapabilitySpec
from hivemesh.sdk.context import Context
from hivemesh.sdk.escalation import InputRequired

_NAME = re.compile(r"[^a-z0-9._-]+")
_VERSION = re.compile(r"[^0-9A-Za-z.+_-]+")
MAX_ANSWER_BYTES: Final = 8 * 1024 * 1024
"""The most bytes one answer of an external A2A agent (its card, a JSON-RPC answer) may have: httpx reads a body
whole, so without a bound a broken or hostile agent could make the bridge hold any amount of memory."""


class AnswerTooLargeError(httpx.RequestError):
    """An answer passed MAX_ANSWER_BYTES (declared, or counted as it arrived): refused, never read on."""


class _CappedBody(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self._inner, self._request, self._size = inner, request, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._size += len(chunk)
            if self._size > MAX_ANSWER_BYTES:
                raise AnswerTooLargeError(f"the answer passed {MAX_ANSWER_BYTES >> 20} MiB", request=self._request)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _cap(response: httpx.Response) -> None:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):  # a small compressed body can unpack to any size
        raise AnswerTooLargeError(f"the answer is compressed ({encoding[:40]}) though asked not to be",
                                  request=response.request)
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
        raise AnswerTooLargeError(f"the answer declares {int(declared)} bytes, more than {MAX_ANSWER_BYTES}",
                                  request=response.request)
    if isinstance(response.stream, httpx.AsyncByteStream):
        response.stream = _CappedBody(response.stream, response.request)


def http_client(**kwargs: Any) -> httpx.AsyncClient:
    """An httpx client for `fetch_card` and `A2ABridgeAgent.from_card` whose every answer is bounded
    (MAX_ANSWER_BYTES, declared or counted as it arrives) and uncompressed; kwargs go to httpx.AsyncClient."""
    headers = {"Accept-Encoding": "identity", **kwargs.pop("headers", {})}
    hooks = kwargs.pop("event_hooks", {})
    hooks = {**hooks, "response": [*hooks.get("response", []), _cap]}
    return httpx.AsyncClient(headers=headers, event_hooks=hooks, **kwargs)


def mesh_name(text: str) -> str:
    """text as a mesh agent or capability name ([a-z0-9][a-z0-9._-]{0,62})."""
    name = _NAME.sub("-", text.lower()).strip("-._")[:63]
    if not name:
        raise InvalidInputError(f"{text!r} gives no usable mesh name: name it explicitly")
    return name


def mesh_version(text: str) -> str:
    """An external card's version as a mesh card version ([0-9A-Za-z.+_-]{0,64}, what the registry takes):
    other characters become "-"; "0.0.0" when nothing is left."""
    return _VERSION.sub("-", text)[:64].strip("-") or "0.0.0"


def card_url(url: str) -> str:
    """The card's URL: url itself when it names a .json document, else its well-known card path."""
    return url if url.endswith(".json") else url.rstrip("/") + AGENT_CARD_WELL_KNOWN_PATH


async def fetch_card(url: str, http: httpx.AsyncClient) -> AgentCard:
    """The A2A agent card at url (a card URL or the agent's base URL)."""
    try:
        resp = await http.get(card_url(url))
        resp.raise_for_status()
        return parse_agent_card(resp.json())
    except (httpx.HTTPError, ValueError, json_format.ParseError) as exc:  # ParseError: JSON, but not a card
        # (An AnswerTooLargeError from `http_client` is an HTTPError too.)
        raise InvalidInputError(f"could not read an A2A agent card at {card_url(url)}: {exc}") from None


def _clip(text: str, limit: int = 200) -> str:
    """An external agent's words, bounded: it may say anything at any length."""
    return text if len(text) <= limit else text[:limit] + "..."


def _message(value: Any, skill: str) -> Message:
    if isinstance(value, dict) and set(value) == {"text"} and isinstance(value["text"], str):
        value = value["text"]
    part: Part = new_text_part(value) if isinstance(value, str) else new_data_part(value)
    msg = Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[part])
    msg.metadata.CopyFrom(ParseDict({"skill": skill}, struct_pb2.Struct()))
    return msg


def _value(parts: Any) -> Any:
    data = get_data_parts(parts)
    if data:
        return _ints(data[0])
    return "\n".join(get_text_parts(parts))


class A2ABridgeAgent(Agent):
    """An external A2A agent on the mesh; build one with `from_card`."""

    name: ClassVar[str] = "a2a-bridge"

    def __init__(self, card: AgentCard, client: Client, skills: dict[str, str]) -> None:
        # Agent.__init__ collects @capability methods; this agent's capabilities come from the card instead.
        self.a2a_card = card
        self._client = client
        self._skills = skills
        """mesh capability name -> A2A skill id."""
        by_id = {s.id: s for s in card.skills}
        self.capabilities = {
            cap: CapabilitySpec(
                name=cap, method_name="run_unary", description=by_id[sid].description or by_id[sid].name,
                input_type=Any, output_type=Any, input_schema={}, output_schema={}, streaming=False,
                idempotent=False, tags=("a2a", *by_id[sid].tags), wants_context=True,
            )
            for cap, sid in skills.items()
        }

    @classmethod
    async def from_card(cls, card: AgentCard, http: httpx.AsyncClient, *, name: str | None = None) -> A2ABridgeAgent:
        """A bridge to card's agent, named name (default: from the card), calling it over http."""
        if not card.skills:
            raise InvalidInputError(f"the A2A agent {card.name!r} declares no skills: nothing to serve")
        agent_name = mesh_name(name or card.name)
        kind = type(f"A2ABridge_{agent_name}", (cls,), {
            "name": agent_name, "description": card.description, "version": mesh_version(card.version),
            "labels": {"a2a.url": card.supported_interfaces[0].url[:63] if card.supported_interfaces else ""},
        })
        client = await create_client(card, ClientConfig(httpx_client=http, streaming=False))
        skills = {mesh_name(s.id): s.id for s in card.skills}
        return kind(card, client, skills)  # type: ignore[no-any-return]

    async def run_unary(self, spec: CapabilitySpec, value: Any, ctx: Context) -> Any:
        request = SendMessageRequest(message=_message(value, self._skills[spec.name]))
        last = None
        try:
            async for event in self._client.send_message(request):
                last = event
        except A2AError as exc:
            raise self._failure(exc) from None
        if last is None:
            raise AgentError(f"the A2A agent {self.a2a_card.name!r} answered nothing")
        if last.HasField("message"):
            return _value(last.message.parts)
        task = last.task
        state = task.status.state
        if state == TaskState.TASK_STATE_COMPLETED:
            parts = [p for a in task.artifacts for p in a.parts] or list(task.status.message.parts)
            return _value(parts)
        words = _value(task.status.message.parts) if task.status.HasField("message") else ""
        if state == TaskState.TASK_STATE_INPUT_REQUIRED:
            raise InputRequired(str(words) or f"{self.a2a_card.name} needs input", {"a2a_task": task.id})
        raise AgentError(f"the A2A agent {self.a2a_card.name!r} ended the task {TaskState.Name(state)}: {words}")

    def _failure(self, exc: A2AError) -> HivemeshError:
        """The mesh's error for a failed call to the A2A agent: its invalid-params as the caller's bad input, a
        network failure as unavailable (the caller may retry elsewhere or later), the rest (HTTP errors, answers
        that do not parse, its other JSON-RPC errors) as the agent's error, in a few words."""
        who = f"the A2A agent {self.a2a_card.name!r}"
        words = _clip(str(exc.message or exc))
        if isinstance(exc, InvalidParamsError):
            return InvalidInputError(f"{who} refused the input: {words}")
        if isinstance(exc, A2AClientTimeoutError):
            return DeadlineExceededError(f"{who} did not answer in time")
        cause = exc.__cause__
        if isinstance(cause, AnswerTooLargeError):
            return AgentError(f"{who} answered too much: {cause}")
        if isinstance(cause, httpx.HTTPStatusError):
            return AgentError(f"{who} answered HTTP {cause.response.status_code}")
        if isinstance(cause, httpx.TransportError):
            return AgentUnavailableError(f"{who} is unreachable: {_clip(str(cause) or type(cause).__name__)}")
        if isinstance(cause, ValueError):  # JSONDecodeError: HTML, plain text, half an answer
            return AgentError(f"{who} answered something that is not A2A JSON-RPC")
        return AgentError(f"{who} failed: {words}")

    async def close(self) -> None:
        await self._client.close()

"""The gRPC `Agent` servicer for SDK agents: turns protobuf calls into capability method calls.

Thin on purpose: the mesh's inbound chain (run by the interceptor before this) has already authenticated the
caller, checked the token and validated and decoded the input; this servicer only dispatches and encodes.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from hivemesh.mesh.errors import AgentError, HivemeshError, InvalidInputError, UnknownCapabilityError, abort
from hivemesh.mesh.layers import current_inbound
from hivemesh.sdk.agent import Agent, CapabilitySpec
from hivemesh.sdk.context import Context
from hivemesh.sdk.escalation import InputRequired
from hivemesh.sdk.idempotency import DedupeStore, fingerprint
from hivemesh.sdk.llm import metering
from hivemesh.v1 import agent_pb2, agent_pb2_grpc

if TYPE_CHECKING:
    from hivemesh.sdk.budget import TokenBudgets
    from hivemesh.sdk.client import MeshClient

log = logging.getLogger(__name__)
_JSON = "application/json"
_ENCODER = json.JSONEncoder(separators=(",", ":"))
"""`json.dumps(x, separators=(",", ":"))` without building a new encoder on every call."""


def _bearer(metadata: Any) -> str:
    value = metadata.get("authorization", "") if metadata else ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value[7:].strip() if isinstance(value, str) and value[:7].lower() == "bearer " else ""


class AgentServicer(agent_pb2_grpc.AgentServicer):
    """Serves one SDK `Agent` over the hivemesh.v1.Agent contract."""

    def __init__(
        self,
        agent: Agent,
        *,
        hop: agent_pb2.Hop,
        mesh: MeshClient | None = None,
        dedupe: DedupeStore | None = None,
        budgets: TokenBudgets | None = None,
    ) -> None:
        self._agent = agent
        self._card = agent.card()
        self._hop = hop
        self._mesh = mesh
        self._dedupe = dedupe
        self._budgets = budgets
        # What every unary answer shares, copied per call (cheaper than building the hop into each response).
        self._response = agent_pb2.InvokeResponse(content_type=_JSON, hops=[hop])

    async def _execute(self, spec: CapabilitySpec, value: Any, ctx: Context) -> tuple[int, Any, agent_pb2.Usage]:
        """Run a capability once: (task state, JSON output, usage). Token usage is metered and charged here, so
        a deduplicated replay is neither run nor charged again."""
        if self._budgets is not None:
            self._budgets.check(ctx.caller, spec.name)
        state = agent_pb2.TASK_STATE_COMPLETED
        try:
            with metering(ctx.usage):
                if spec.streaming:
                    result: Any = [item async for item in self._agent.run_stream(spec, value, ctx)]
                else:
                    result = await self._agent.run_unary(spec, value, ctx)
        except InputRequired as ask:
            state, result = agent_pb2.TASK_STATE_INPUT_REQUIRED, ask.to_json()
        used = ctx.usage.usage
        if self._budgets is not None:
            self._budgets.charge(ctx.caller, spec.name, used.total)
        return state, result, agent_pb2.Usage(
            input_tokens=used.input_tokens, output_tokens=used.output_tokens, model=used.model
        )

    async def _run(
        self, request: agent_pb2.InvokeRequest, spec: CapabilitySpec, value: Any, ctx: Context
    ) -> tuple[int, Any, agent_pb2.Usage]:
        key = ctx.call.idempotency_key
        if key and not spec.idempotent and spec.dedupe and self._dedupe is not None:
            # A non-idempotent effect with a key: run it once, join a running attempt, replay a finished one.
            # Keys of a workflow's steps are shared by whoever drives the run (a resumer may be another
            # identity, e.g. the operator); other keys are the caller's own.
            scope = (f"workflow:{ctx.call.workflow_id}" if ctx.call.workflow_id else ctx.caller, spec.name, key)
            outcome: tuple[int, Any, agent_pb2.Usage] = await self._dedupe.run(
                scope, fingerprint(request.input), lambda: self._execute(spec, value, ctx)
            )
            return outcome
        return await self._execute(spec, value, ctx)

    async def Describe(
        self, request: agent_pb2.DescribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.AgentCard:
        return self._card

    def _prepare(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[CapabilitySpec, Any, Context]:
        found = self._agent.handler(request.capability)
        if found is None:
            raise UnknownCapabilityError(f"agent {self._agent.name!r} has no capability {request.capability!r}")
        spec, _ = found
        inbound = current_inbound.get()
        if inbound is not None and inbound.request is not None and inbound.parsed_input is not None:
            value = inbound.parsed_input
        else:
            try:
                value = json.loads(request.input) if request.input else None
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InvalidInputError(f"input is not valid JSON: {exc}") from None
        call_ctx = agent_pb2.CallContext()
        call_ctx.CopyFrom(request.context)
        if not call_ctx.call_id:
            call_ctx.call_id = uuid.uuid4().hex
        claims = inbound.claims if inbound is not None else None
        ctx = Context(
            capability=spec.name,
            caller=claims.presenter if claims is not None else "",
            call=call_ctx,
            metadata=dict(request.metadata),
            scopes=claims.scopes if claims is not None else frozenset(),
            mesh=self._mesh,
            _grpc=context,
            principal=claims.subject if claims is not None else "",
            chain=claims.delegation if claims is not None else (),
            subject_token=_bearer(inbound.metadata) if inbound is not None else "",
        )
        return spec, value, ctx

    async def Invoke(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.InvokeResponse:
        try:
            spec, value, ctx = self._prepare(request, context)
            state, result, usage = await self._run(request, spec, value, ctx)
        except HivemeshError as err:
            await abort(context, err)
        except (TypeError, ValueError) as exc:
            # Raised by the agent's own code on input it cannot use: the caller's problem, said plainly.
            await abort(context, InvalidInputError(f"capability {request.capability!r} refused the input: {exc}"))
        except Exception as exc:
            log.exception("capability %s failed", request.capability)
            await abort(context, AgentError(f"capability {request.capability!r} failed: {type(exc).__name__}: {exc}"))
        try:
            output = _ENCODER.encode(result).encode()
        except (TypeError, ValueError) as exc:
            await abort(context, AgentError(f"capability {request.capability!r} returned non-JSON output: {exc}"))
        response = agent_pb2.InvokeResponse()
        response.CopyFrom(self._response)
        response.output = output
        response.state = state  # type: ignore[assignment]
        if usage.input_tokens or usage.output_tokens:
            response.usage.CopyFrom(usage)
        return response

    async def InvokeStream(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.InvokeChunk]:
        final = agent_pb2.InvokeChunk(final=True, state=agent_pb2.TASK_STATE_COMPLETED, hops=[self._hop])
        try:
            spec, value, ctx = self._prepare(request, context)
            if self._budgets is not None:
                self._budgets.check(ctx.caller, spec.name)
            try:
                if spec.streaming:
                    # The generator's body runs in this task's context, so the meter is current while it runs.
                    with metering(ctx.usage):
                        async for item in self._agent.run_stream(spec, value, ctx):
                            yield agent_pb2.InvokeChunk(
                                data=json.dumps(item, separators=(",", ":")).encode(),
                                content_type=_JSON,
                                state=agent_pb2.TASK_STATE_WORKING,
                            )
                else:
                    state, result, _usage = await self._run(request, spec, value, ctx)
                    if state == agent_pb2.TASK_STATE_INPUT_REQUIRED:
                        final.state = agent_pb2.TASK_STATE_INPUT_REQUIRED
                    yield agent_pb2.InvokeChunk(
                        data=json.dumps(result, separators=(",", ":")).encode(),
                        content_type=_JSON,
                        state=agent_pb2.TASK_STATE_WORKING,
                    )
            except InputRequired as ask:
                final.state = agent_pb2.TASK_STATE_INPUT_REQUIRED
                final.data = json.dumps(ask.to_json(), separators=(",", ":")).encode()
                final.content_type = _JSON
            used = ctx.usage.usage
            if used.total:
                final.usage.CopyFrom(agent_pb2.Usage(input_tokens=used.input_tokens,
                                                     output_tokens=used.output_tokens, model=used.model))
            if spec.streaming and self._budgets is not None:
                self._budgets.charge(ctx.caller, spec.name, used.total)
        except HivemeshError as err:
            await abort(context, err)
        except (TypeError, ValueError) as exc:
            await abort(context, InvalidInputError(f"capability {request.capability!r} refused the input: {exc}"))
        except Exception as exc:
            log.exception("capability %s failed", request.capability)
            await abort(context, AgentError(f"capability {request.capability!r} failed: {type(exc).__name__}: {exc}"))
        yield final

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
from hivemesh.v1 import agent_pb2, agent_pb2_grpc

if TYPE_CHECKING:
    from hivemesh.sdk.client import MeshClient

log = logging.getLogger(__name__)
_JSON = "application/json"


class AgentServicer(agent_pb2_grpc.AgentServicer):
    """Serves one SDK `Agent` over the hivemesh.v1.Agent contract."""

    def __init__(self, agent: Agent, *, hop: agent_pb2.Hop, mesh: MeshClient | None = None) -> None:
        self._agent = agent
        self._card = agent.card()
        self._hop = hop
        self._mesh = mesh

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
            caller=claims.subject if claims is not None else "",
            call=call_ctx,
            metadata=dict(request.metadata),
            scopes=claims.scopes if claims is not None else frozenset(),
            mesh=self._mesh,
            _grpc=context,
        )
        return spec, value, ctx

    async def Invoke(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.InvokeResponse:
        try:
            spec, value, ctx = self._prepare(request, context)
            if spec.streaming:
                items = [item async for item in self._agent.run_stream(spec, value, ctx)]
                result: Any = items
            else:
                result = await self._agent.run_unary(spec, value, ctx)
        except HivemeshError as err:
            await abort(context, err)
        except (TypeError, ValueError) as exc:
            # Raised by the agent's own code on input it cannot use: the caller's problem, said plainly.
            await abort(context, InvalidInputError(f"capability {request.capability!r} refused the input: {exc}"))
        except Exception as exc:
            log.exception("capability %s failed", request.capability)
            await abort(context, AgentError(f"capability {request.capability!r} failed: {type(exc).__name__}: {exc}"))
        try:
            output = json.dumps(result, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            await abort(context, AgentError(f"capability {request.capability!r} returned non-JSON output: {exc}"))
        return agent_pb2.InvokeResponse(
            output=output,
            content_type=_JSON,
            state=agent_pb2.TASK_STATE_COMPLETED,
            hops=[self._hop],
        )

    async def InvokeStream(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.InvokeChunk]:
        try:
            spec, value, ctx = self._prepare(request, context)
            if spec.streaming:
                async for item in self._agent.run_stream(spec, value, ctx):
                    yield agent_pb2.InvokeChunk(
                        data=json.dumps(item, separators=(",", ":")).encode(),
                        content_type=_JSON,
                        state=agent_pb2.TASK_STATE_WORKING,
                    )
            else:
                result = await self._agent.run_unary(spec, value, ctx)
                yield agent_pb2.InvokeChunk(
                    data=json.dumps(result, separators=(",", ":")).encode(),
                    content_type=_JSON,
                    state=agent_pb2.TASK_STATE_WORKING,
                )
        except HivemeshError as err:
            await abort(context, err)
        except (TypeError, ValueError) as exc:
            await abort(context, InvalidInputError(f"capability {request.capability!r} refused the input: {exc}"))
        except Exception as exc:
            log.exception("capability %s failed", request.capability)
            await abort(context, AgentError(f"capability {request.capability!r} failed: {type(exc).__name__}: {exc}"))
        yield agent_pb2.InvokeChunk(final=True, state=agent_pb2.TASK_STATE_COMPLETED, hops=[self._hop])

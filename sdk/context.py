"""What a capability handler knows about the call it serves, and how it calls onward within it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Unpack

import grpc

from hivemesh.sdk.call_options import CallOptionArgs, CallOptions
from hivemesh.sdk.llm import UsageMeter
from hivemesh.v1 import agent_pb2

if TYPE_CHECKING:
    from hivemesh.sdk.client import CallResult, MeshClient
    from hivemesh.sdk.memory import Memory


@dataclass
class Context:
    """Per-call context handed to capabilities that take a third `ctx` parameter.

    Onward calls made through `ctx.call` carry this call's remaining deadline (so a chain never outlives its
    caller), its workflow and conversation ids, and this call as their parent.
    """

    capability: str
    caller: str
    """SPIFFE id of the caller, established by mutual TLS and the token check."""
    call: agent_pb2.CallContext
    metadata: Mapping[str, str] = field(default_factory=dict)
    scopes: frozenset[str] = frozenset()
    mesh: MeshClient | None = None
    _grpc: grpc.aio.ServicerContext[Any, Any] | None = field(default=None, repr=False)
    usage: UsageMeter = field(default_factory=UsageMeter)
    """Model tokens this call has used so far; reported to the caller in InvokeResponse.usage."""
    principal: str = ""
    """Whom the call is made for: the caller itself, or the original principal of a delegated call."""
    chain: tuple[str, ...] = ()
    """The delegation chain in call order (principal, actor, ...), or just the caller."""
    subject_token: str = field(default="", repr=False)
    """The token this call came with: what an onward call `on_behalf=True` exchanges for a delegated one."""

    @property
    def idempotency_key(self) -> str:
        """The caller's key for this call's effect ("" when none): store it with the effect to apply it once."""
        return self.call.idempotency_key

    @property
    def workflow_id(self) -> str:
        return self.call.workflow_id

    @property
    def memory(self) -> Memory:
        """This conversation's memory across calls (history, preferences), kept by the control plane:
        `hivemesh.sdk.memory`."""
        from hivemesh.sdk.memory import conversation_memory  # memory imports this module's type

        return conversation_memory(self)

    @property
    def user_memory(self) -> Memory:
        """The memory of this call's principal, across its conversations."""
        from hivemesh.sdk.memory import user_memory

        return user_memory(self)

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or None when the caller set none."""
        if self._grpc is None:
            return None
        return self._grpc.time_remaining()

    def _onward(self, options: CallOptions | None, overrides: CallOptionArgs) -> tuple[MeshClient, CallOptions]:
        """The mesh and the options of an onward call: this call's remaining deadline caps the timeout, and its
        ids (and this call as parent, and its chain with this agent added) come first in the context, under what
        the options' context sets."""
        if self.mesh is None:
            raise RuntimeError("this agent is not connected to a mesh: serve it with hivemesh.sdk.serve()")
        opts = CallOptions.of(options, overrides)
        timeout, remaining = opts.timeout, self.time_remaining()
        if remaining is not None:
            timeout = remaining if timeout is None else min(timeout, remaining)
        child = agent_pb2.CallContext(
            parent_call_id=self.call.call_id,
            conversation_id=self.call.conversation_id,
            workflow_id=self.call.workflow_id,
            priority=self.call.priority,
            # This agent joins the call chain: the callee's loop guard refuses a call back into it (A -> B -> A).
            chain=[*self.call.chain, str(self.mesh.node.workload.spiffe_id)],
        )
        if opts.context is not None:
            child.MergeFrom(opts.context)
        return self.mesh, dataclasses.replace(opts, timeout=timeout, context=child)

    async def call_capability(
        self,
        capability: str,
        payload: Any,
        *,
        on_behalf: bool = False,
        options: CallOptions | None = None,
        **overrides: Unpack[CallOptionArgs],
    ) -> Any:
        """Call another capability on the mesh as part of this call (deadline and ids propagate).

        on_behalf: act for this call's principal (RFC 8693 delegation): the callee sees the whole chain, its
        policies can match the original principal, and it gets only what both the principal and this agent are
        granted, within what the incoming token allows to be delegated.
        """
        mesh, opts = self._onward(options, overrides)
        if not on_behalf:
            return await mesh.call(capability, payload, options=opts)
        if not self.subject_token:
            raise RuntimeError("this call came without a token to delegate")
        with mesh.on_behalf_of(self.subject_token):
            return await mesh.call(capability, payload, options=opts)

    async def call_detailed(
        self,
        capability: str,
        payload: Any = None,
        *,
        options: CallOptions | None = None,
        **overrides: Unpack[CallOptionArgs],
    ) -> CallResult:
        """`MeshClient.call_detailed` within this call: deadline, workflow and conversation ids propagate, so an
        agent can run any orchestration pattern (`hivemesh.sdk.patterns`) with `ctx` as the caller."""
        mesh, opts = self._onward(options, overrides)
        return await mesh.call_detailed(capability, payload, options=opts)

    async def call_on(
        self,
        instance: Any,
        capability: str,
        payload: Any = None,
        *,
        options: CallOptions | None = None,
        **overrides: Unpack[CallOptionArgs],
    ) -> CallResult:
        """`MeshClient.call_on` within this call (one given instance)."""
        mesh, opts = self._onward(options, overrides)
        return await mesh.call_on(instance, capability, payload, options=opts)

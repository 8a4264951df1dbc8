"""Conversation memory across requests: history and preferences per conversation (or per user), on shared state.

A capability reaches it as `ctx.memory` (this call's conversation) or `ctx.user_memory` (this call's principal):

    turns = await ctx.memory.history()
    await ctx.memory.remember("user", req["text"])
    await ctx.memory.prefer(language="fr")

It lives in the agent's own namespace, `memory/<kind>-<name>/c/<conversation>` (or `/u/<principal>`), which the
control plane lets the agent read and write without a policy; by default an entry is forgotten 30 days after
its last write and a namespace holds at most 256 KiB (a `state` policy naming the namespace may change both).
History is bounded here too: the newest `max_turns` turns that fit in `max_bytes` are kept, oldest dropped
first. Writes are compare-and-swap, so two concurrent calls of one conversation both get their turn in.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any, Final

from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.pki import parse_spiffe_id
from hivemesh.sdk.state import StateClient, dumps

if TYPE_CHECKING:
    from hivemesh.sdk.context import Context

HISTORY: Final = "history"
PREFERENCES: Final = "preferences"
MAX_TURNS: Final = 50
MAX_BYTES: Final = 60 * 1024
"""Below the memory namespaces' default 64 KiB per value, so a full history is never refused."""
_SEGMENT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@=+-]{0,127}")


def segment(text: str) -> str:
    """text as one namespace segment: itself when it is one, else a digest of it (ids are free-form)."""
    return text if _SEGMENT.fullmatch(text) else "h." + hashlib.sha256(text.encode()).hexdigest()[:40]


def owner_segment(spiffe_id: str) -> str:
    sid = parse_spiffe_id(spiffe_id)
    return f"{sid.kind}-{sid.name}"


class Memory:
    """History (a list of turns) and preferences (an object) in one namespace."""

    def __init__(self, state: StateClient, namespace: str, *, max_turns: int = MAX_TURNS,
                 max_bytes: int = MAX_BYTES) -> None:
        # ints, checked by type too: NaN passed every comparison and then broke the history slicing.
        for name, value, least in (("max_turns", max_turns, 1), ("max_bytes", max_bytes, 64)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, not {value!r}")
        self.state = state
        self.namespace = namespace
        self.max_turns = max_turns
        self.max_bytes = max_bytes

    async def history(self) -> list[dict[str, Any]]:
        """The remembered turns, oldest first."""
        entry = await self.state.get(self.namespace, HISTORY)
        return list(entry.value) if entry is not None and isinstance(entry.value, list) else []

    async def remember(self, role: str, content: Any, **extra: Any) -> list[dict[str, Any]]:
        """Append a turn ({"role", "content", ...extra}) and return the bounded history as stored."""
        if not role:
            raise InvalidInputError("a memory turn needs a role (e.g. 'user', 'assistant')")
        turn = {"role": role, "content": content, **extra}
        if len(dumps([turn]).encode()) > self.max_bytes:
            raise InvalidInputError(f"one turn of {len(dumps(turn).encode())} bytes is more than this memory "
                                    f"keeps ({self.max_bytes} bytes)")

        def append(current: Any) -> list[Any]:
            turns = [*(current if isinstance(current, list) else []), turn][-self.max_turns:]
            while len(dumps(turns).encode()) > self.max_bytes:
                turns.pop(0)
            return turns

        return list((await self.state.update(self.namespace, HISTORY, append, default=[])).value)

    async def preferences(self) -> dict[str, Any]:
        entry = await self.state.get(self.namespace, PREFERENCES)
        return dict(entry.value) if entry is not None and isinstance(entry.value, dict) else {}

    async def prefer(self, **preferences: Any) -> dict[str, Any]:
        """Merge preferences in (a value of None removes that preference); the preferences as stored."""

        def merge(current: Any) -> dict[str, Any]:
            out = dict(current) if isinstance(current, dict) else {}
            out.update(preferences)
            return {k: v for k, v in out.items() if v is not None}

        return dict((await self.state.update(self.namespace, PREFERENCES, merge, default={})).value)

    async def forget(self) -> None:
        """Drop the history and the preferences."""
        for key in (HISTORY, PREFERENCES):
            await self.state.delete(self.namespace, key)


def conversation_namespace(owner_spiffe_id: str, conversation_id: str) -> str:
    return f"memory/{owner_segment(owner_spiffe_id)}/c/{segment(conversation_id)}"


def user_namespace(owner_spiffe_id: str, principal: str) -> str:
    try:
        who = owner_segment(principal)
    except ValueError:
        who = principal
    return f"memory/{owner_segment(owner_spiffe_id)}/u/{segment(who)}"


def _state_of(ctx: Context) -> tuple[StateClient, str]:
    if ctx.mesh is None:
        raise RuntimeError("this agent is not connected to a mesh: serve it with hivemesh.sdk.serve()")
    node = ctx.mesh.node
    return StateClient(node.controlplane), str(node.workload.spiffe_id)


def conversation_memory(ctx: Context) -> Memory:
    """The memory of ctx's conversation (the caller sets `CallContext.conversation_id`)."""
    if not ctx.call.conversation_id:
        raise InvalidInputError("this call has no conversation_id, so it has no conversation memory: the caller "
                                "sets CallContext.conversation_id (CallOptions(context=...))")
    state, owner = _state_of(ctx)
    return Memory(state, conversation_namespace(owner, ctx.call.conversation_id))


def user_memory(ctx: Context) -> Memory:
    """The memory of ctx's principal (whom the call is made for), across its conversations."""
    state, owner = _state_of(ctx)
    return Memory(state, user_namespace(owner, ctx.principal or ctx.caller))


__all__ = ["Memory", "conversation_memory", "conversation_namespace", "user_memory", "user_namespace"]

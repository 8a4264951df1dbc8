"""How one capability call is made, as one value: `CallOptions`.

`MeshClient`, a capability's `Context` and the patterns' `Caller` all call capabilities; they hand this one
value on instead of each re-declaring and forwarding every option. Call sites keep their keywords:

    await mesh.call("charge", order, timeout=5, idempotency_key=order["id"])
    urgent = CallOptions(timeout=2, context=agent_pb2.CallContext(priority=10))
    await mesh.call("triage", ticket, options=urgent)                 # a reusable set of options
    await mesh.call("triage", ticket, options=urgent, timeout=5)      # keywords override the set's fields
    await mesh.call("triage", ticket, agent="alpha")                  # alpha's instances only, with failover
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypedDict

from hivemesh.mesh.pki import validate_name
from hivemesh.v1 import agent_pb2


class CallOptionArgs(TypedDict, total=False):
    """`CallOptions`' fields as keyword arguments (what `**overrides` of a call method accepts)."""

    timeout: float | None
    context: agent_pb2.CallContext | None
    idempotency_key: str | None
    queue_for: float | None
    agent: str | None


@dataclass(frozen=True)
class CallOptions:
    """The options of one call, besides the capability and its input."""

    timeout: float | None = None
    """Seconds until the call's deadline; None: the capability's `timeouts` policy, then the client default.
    Inside a capability, an onward call never outlives the call it serves."""
    context: agent_pb2.CallContext | None = None
    """Ids the call carries (conversation, workflow, priority, ...); read, never modified."""
    idempotency_key: str | None = None
    """The caller's key for the call's effect: a non-idempotent capability applies each key's effect once."""
    queue_for: float | None = None
    """Seconds to hold the call durably (`hivemesh.mesh.queue`) when no instance serves the capability, instead
    of failing NO_LIVE_INSTANCE: delivered once one registers. `call`/`call_detailed` only. A timeout (or, inside
    a capability, the served call's deadline) bounds it: the call is held no longer, never delivered past it,
    and the caller gets DEADLINE_EXCEEDED naming the held id (ErrorInfo metadata `queued_id`)."""
    agent: str | None = None
    """Only instances registered by this agent (their card's name) may serve the call: unary, batch and stream.
    A filter applied before routes, breakers, affinity and balancing, so a pinned call keeps the whole attempt
    loop (failover between the agent's instances, retries, instance breakers, deadline). It is outside the
    capability's breaker, neither counted nor refused by it: a pin to a down or failing agent never fails the
    capability for other callers; once its agent's instance breakers eject all of its instances it fails
    CIRCUIT_OPEN naming the agent. With an operator's `routes` policy the deciding rule chooses among the
    agent's instances. A rule that chose only other agents' instances (a pin or split to a version only another
    agent runs) is set aside for the call, which goes to the agent's instances except those the rule's split
    weighs 0 and a shadow's candidates; a rule that allows no live instance to anyone fails the call
    NO_LIVE_INSTANCE, as it fails an unpinned one. A fallback capability is called pinned too, and only the
    agent's own cached answer is served. No live instance of the agent: NO_LIVE_INSTANCE naming it. Not with
    `queue_for`: a held call is delivered unpinned."""

    def __post_init__(self) -> None:
        if self.agent is not None:
            check_agent(self.agent, self.queue_for)

    @classmethod
    def of(cls, options: CallOptions | None, overrides: CallOptionArgs) -> CallOptions:
        """options (default: none set) with the fields given as keywords replaced."""
        if not overrides:
            return options if options is not None else _NONE
        if options is None:
            return cls(**overrides)  # the common case, `timeout=5`: cheaper than replace() on the hot path
        return dataclasses.replace(options, **overrides)


def check_agent(agent: str, queue_for: float | None) -> None:
    """ValueError unless agent is a valid agent name that may pin a call with these options."""
    validate_name(agent, "agent")
    if queue_for:
        raise ValueError(f"agent={agent!r} cannot be combined with queue_for: a held call is delivered by the "
                         "queue to any agent serving the capability, so the pin would not hold")


_NONE = CallOptions()

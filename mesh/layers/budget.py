"""Token budgets: a caller whose budget for a capability is spent is refused (RESOURCE_EXHAUSTED /
TOKEN_BUDGET_EXCEEDED, with RetryInfo to the window's end); after a call, the tokens its response reports in
`usage` are charged (`hivemesh.mesh.budget`). A layer, so an agent behind a sidecar is held to its budgets
exactly as an SDK agent is: only the answer's `usage` field is read, whoever wrote it."""

from __future__ import annotations

import logging
from typing import Any

from google.protobuf.message import DecodeError

from hivemesh.mesh import invoke_wire
from hivemesh.mesh.budget import TokenBudgets
from hivemesh.mesh.errors import PeerUnauthenticatedError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.v1 import agent_pb2

log = logging.getLogger(__name__)


def usage_tokens(method: str, response: Any, noted: agent_pb2.Usage | None = None) -> int:
    """Input + output tokens a response reports: an InvokeResponse, an InvokeChunk (a stream's final chunk
    reports them), or the serialized bytes of one (what a forwarder relays); 0 when it reports none or cannot
    be read. noted: the usage its writer noted it carries (`Inbound.noted_usage`), then taken as is."""
    if noted is not None:
        return int(noted.input_tokens + noted.output_tokens)
    if isinstance(response, bytes):
        kind = agent_pb2.InvokeChunk if method == "InvokeStream" else agent_pb2.InvokeResponse
        try:
            response = invoke_wire.answer(method, response)
        except DecodeError:
            log.warning("cannot read the usage of a %s response: not a valid %s", method, kind.DESCRIPTOR.name)
            return 0
    if not isinstance(response, agent_pb2.InvokeResponse | agent_pb2.InvokeChunk):
        return 0
    usage = response.usage
    return int(usage.input_tokens + usage.output_tokens)


class BudgetLayer:
    """Runs after the token check (a budget is a verified caller's) and the rate limit, before the input guard
    (a refusal should cost as little as possible). With no rule for the caller and capability, the check is
    a lookup and nothing is charged after."""

    name = "budget"

    def __init__(self, budgets: TokenBudgets) -> None:
        self.budgets = budgets

    def check(self, call: Inbound) -> None:
        req = call.request
        if req is None:
            return
        claims = call.claims
        if claims is None:  # ordering guard: the token layer runs first
            raise PeerUnauthenticatedError()
        if self.budgets.check(claims.presenter, req.capability):
            call.charge_usage = True

    def settle(self, call: Inbound, response: Any) -> None:
        """Charge the tokens the answer reports (a stream: each chunk's, before it is sent; only the final
        chunk reports usage), so a caller that stops reading early has still paid."""
        if not call.charge_usage or call.request is None or call.claims is None:
            return
        tokens = usage_tokens(call.method, response, call.noted_usage(response))
        if tokens > 0:
            self.budgets.charge(call.claims.presenter, call.request.capability, tokens)

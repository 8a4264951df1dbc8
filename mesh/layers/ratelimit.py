"""Rate limit: token buckets per caller identity × capability under a per-capability total (`ratelimits`
policies), enforced where the capability is served. A refused call is RESOURCE_EXHAUSTED / RATE_LIMITED with
RetryInfo and `grpc-retry-pushback-ms`, so well-behaved clients wait instead of retrying blindly."""

from __future__ import annotations

from collections.abc import Callable

from hivemesh.mesh.errors import RateLimitedError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.resilience.traffic import Traffic


class RateLimitLayer:
    """Runs after the token check (it limits a verified identity) and before the input guard (a refused call
    should cost as little as possible). Reads only the compiled policy view and in-memory buckets.

    instances(capability) is how many live instances share a cluster-wide limit (this agent's instances
    serving the capability, from the registry view); each enforces its share of the cluster total and of
    the per-identity limits (unless their scope is "instance").
    """

    name = "rate-limit"

    def __init__(self, traffic: Traffic, agent_name: str, instances: Callable[[str], int] | None = None) -> None:
        self._traffic = traffic
        self._agent = agent_name
        self._instances = instances
        # What status reports as the limit follows the policies in force, not the last call checked.
        traffic.state.limiter.follow(lambda cap: traffic.policy.ratelimit(agent_name, cap), instances)

    def check(self, call: Inbound) -> None:
        req = call.request
        if req is None:
            return
        policy = self._traffic.policy.ratelimit(self._agent, req.capability)
        if policy is None:
            return
        identity = str(call.peer.spiffe_id) if call.peer is not None else ""
        n = self._instances(req.capability) if self._instances is not None and policy.shared else 1
        wait = self._traffic.state.limiter.check(policy, req.capability, identity, instances=n)
        if wait > 0.0:
            raise RateLimitedError(
                f"rate limit of {req.capability!r} reached for {identity or 'this caller'}; retry in {wait:.3f} s",
                metadata={"capability": req.capability[:128], "identity": identity[:256]},
                retry_after_s=wait,
            )

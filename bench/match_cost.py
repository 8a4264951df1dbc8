"""What matching an identity against a policy's list of names and globs costs: one regex alternation, as grants,
budget rules, authz rules and teams and rate-limit overrides compiled their lists until 7 Dec, against
`mesh.globs.Globs` (names in a set, only real globs compiled), in one run. Then the real policy paths that use
`Globs`: a rate-limit override of 50,000 identities and authz at the schema's bounds (256 teams of 256 names).
CPU time of this one process (`time.process_time`), medians of a few repetitions.

    .venv/bin/python bench/match_cost.py        # ~1 min on 2 cores
"""

from __future__ import annotations

import fnmatch
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from hivemesh.mesh.authz import AUTHZ, AuthzRequest, compile_authz
from hivemesh.mesh.globs import Globs
from hivemesh.mesh.policy import PolicyDoc
from hivemesh.mesh.resilience.kinds import RATELIMITS

_TD = "spiffe://hivemesh.local"


def _cpu(work: Callable[[], Any], repeat: int, inner: int = 1) -> float:
    """Median CPU seconds of one `work()` over repeat runs of inner calls each."""
    runs = []
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(inner):
            work()
        runs.append((time.process_time() - start) / inner)
    return statistics.median(runs)


def _alternation(patterns: list[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def main() -> None:
    lines = [f"# {platform.node()}, Python {platform.python_version()}; CPU time, medians",
             "| case | one regex alternation | Globs | ratio |", "|---|---|---|---|"]

    def row(case: str, old: float, new: float, unit: str) -> None:
        scale = {"us": 1e6, "ms": 1e3}[unit]
        lines.append(f"| {case} | {old * scale:,.1f} {unit} | {new * scale:,.3f} {unit} | {old / new:,.0f}x |")

    for n in (256, 50_000):
        names = [f"{_TD}/client/c-{i:05d}" for i in range(n)] + [f"{_TD}/agent/*"]
        last = names[-2]
        old_build = _cpu(lambda names=names: re.purge() or _alternation(names), 3)
        new_build = _cpu(lambda names=names: Globs(names), 3)
        row(f"build, {n:,} names and a glob", old_build, new_build, "ms")
        rx, globs = _alternation(names), Globs(names)
        inner = 20 if n > 1000 else 2_000
        row(f"match the last name, {n:,} names", _cpu(lambda rx=rx, last=last: rx.match(last), 5, inner),
            _cpu(lambda globs=globs, last=last: globs.match(last), 5, 20_000), "us")

    clients = [f"{_TD}/client/c-{i:05d}" for i in range(50_000)]
    spec = {"agents": ["a"], "capabilities": ["c"], "per_identity_rps": 1,
            "overrides": [{"identities": clients, "rps": 500}]}
    doc = RATELIMITS.validate(PolicyDoc("ratelimits", "r", spec))
    compile_s = _cpu(lambda: RATELIMITS.compile({"r": doc}), 3)
    policy = RATELIMITS.compile({"r": doc}).lookup("c", "a")
    assert policy is not None and policy.identity_rate(clients[-1]) == 500
    rate_s = _cpu(lambda: policy.identity_rate(clients[-1]), 5, 20_000)
    lines += ["", "| real path (Globs) | CPU |", "|---|---|",
              f"| ratelimits: compile an override of 50,000 identities | {compile_s:.3f} s |",
              f"| ratelimits: `identity_rate` for the last listed client | {rate_s * 1e6:.2f} us |"]

    teams = {f"team-{t:03d}": [f"{_TD}/client/t{t:03d}-m{m:03d}" for m in range(256)] for t in range(256)}
    authz = AUTHZ.validate(PolicyDoc("authz", "p", {"teams": teams, "rules": [
        {"name": "allow", "action": "ALLOW", "from": {"teams": ["team-255"]}}]}))
    compile_s = _cpu(lambda: compile_authz({"p": authz}), 3)
    table = compile_authz({"p": authz})
    req = AuthzRequest(caller=f"{_TD}/client/t255-m255", capability="echo", action="invoke", agent="a",
                       principal=f"{_TD}/client/t255-m255")
    assert table.decide(req).allowed
    decide_s = _cpu(lambda: table.decide(req), 5, 2_000)
    lines += [f"| authz: compile 256 teams of 256 names | {compile_s:.3f} s |",
              f"| authz: `decide` for a member of the last team | {decide_s * 1e6:.1f} us |"]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Who owns a durable workflow run: its id, and so its etcd keys, start with the owner, `<kind>-<name>/<local>`.

etcd roles are unions of prefix ranges (there is no deny and no per-key owner), so ownership is fenced by where
a run's keys live. Every key of a run owned by workload kind/name starts with one of

    /hivemesh/workflows/<kind>-<name>/          events and the owner lease of each of its runs
    /hivemesh/workflow-index/<kind>-<name>/     the `list` read model of each of its runs

and that workload's etcd role holds READWRITE on exactly those two prefixes (`hivemesh.mesh.etcd_roles`); the
operator role and the control plane (etcd root) hold all of them. The separator after the owner is `/` because
it is the one character a workload name ([a-z0-9][a-z0-9._-]*) cannot contain: with `.`, the prefix
`client-alice.` would also cover the runs of a client named `alice.eu`. The kind (agent, client, operator) has
no `-`, so the owner segment splits at its first `-`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hivemesh.mesh.keyspace import WORKFLOW_INDEX, WORKFLOWS
from hivemesh.mesh.pki import KINDS, NAME_RE, validate_name

LOCAL_RULE = "[a-z0-9][a-z0-9._-]{0,62}"
FORMAT = f"<kind>-<name>/<local id>, kind one of {', '.join(sorted(KINDS))}, local id {LOCAL_RULE}"


def owner_segment(kind: str, name: str) -> str:
    """The owner part of a run id (and of its keys): `<kind>-<name>`."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(sorted(KINDS))}")
    return f"{kind}-{validate_name(name)}"


@dataclass(frozen=True)
class RunId:
    """A parsed run id: the owner's kind and name, and the id the owner chose (unique among its runs)."""

    kind: str
    name: str
    local: str

    @property
    def owner(self) -> str:
        return f"{self.kind}-{self.name}"

    def __str__(self) -> str:
        return f"{self.owner}/{self.local}"


def parse_run_id(text: str) -> RunId:
    """`<kind>-<name>/<local>` -> RunId; ValueError (saying the format) for anything else."""
    owner, sep, local = text.partition("/")
    kind, dash, name = owner.partition("-")
    if not sep or not dash or kind not in KINDS or not NAME_RE.fullmatch(local):
        raise ValueError(f"run id {text[:160]!r} is not {FORMAT}")
    try:
        validate_name(name)
    except ValueError:
        raise ValueError(f"run id {text[:160]!r} is not {FORMAT}") from None
    return RunId(kind, name, local)


def owner_prefixes(kind: str, name: str) -> tuple[str, str]:
    """The two key prefixes holding every run of kind/name (what its etcd role may read and write)."""
    seg = owner_segment(kind, name)
    return f"{WORKFLOWS}{seg}/", f"{WORKFLOW_INDEX}{seg}/"


def run_prefix(run_id: RunId) -> str:
    """Every key of one run except its index entry: events and the owner lease."""
    return f"{WORKFLOWS}{run_id}/"


def index_key(run_id: RunId) -> str:
    return f"{WORKFLOW_INDEX}{run_id}"

"""The map of the store: every etcd prefix hivemesh writes, in one place.

Whoever reads or writes a part of the keyspace (the data plane, the SDK's workflow store, the control plane's
retention, the etcd roles that fence each workload in) names it from here, so the roles and the code that the
roles govern cannot disagree about where something lives.
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "/hivemesh/"
AGENTS: Final = PREFIX + "agents/"
"""<agent>/<instance>: leased registrations (AgentInstance)."""
POLICIES: Final = PREFIX + "policies/"
"""<kind>/<name>: policy documents every node mirrors."""
GRANTS: Final = PREFIX + "grants/"
"""<name>: who may get which capabilities (only the control plane reads them)."""
GRANTS_FILE: Final = PREFIX + "grants-file"
"""Which grants the control plane's grants file wrote, and what (`controlplane.grants.seed_grants`): one the file
stops naming is deleted only while it is still as written; grants `hivemesh allow` or `policy apply` wrote stay."""
TRUST: Final = PREFIX + "trust/"
"""Signed token key set and CA bundle."""
REVOKED: Final = PREFIX + "revoked/"
"""jti/<id>, sub/<id>: revocations, leased until they expire."""
JOIN: Final = PREFIX + "join/"
"""<sha256(token)>: one-time join tokens."""
STATUS: Final = PREFIX + "status/"
"""<kind>/<name>/<instance>: what `hivemesh status` shows, leased."""
ESCALATIONS: Final = PREFIX + "escalations/"
"""<id>: human escalations."""
WORKFLOWS: Final = PREFIX + "workflows/"
"""<kind>-<name>/<local>/...: a durable run's events and owner key, under its owner (`hivemesh.mesh.run_ids`)."""
WORKFLOW_INDEX: Final = PREFIX + "workflow-index/"
"""<kind>-<name>/<local>: the list read model of runs."""
SPEND: Final = PREFIX + "budgets/spend/"
"""Token budget spend per (rule, caller, window, instance), leased to the window."""
ROLLOUTS: Final = PREFIX + "rollouts/"
"""<name>: an automatic rollout's progress (JSON), written by the control-plane leader only."""
QUEUE: Final = PREFIX + "queue/"
"""<kind>-<name>/<id>: a caller's calls held until an instance is live (`hivemesh.mesh.queue`), leased to their
max wait, and `<id>.claim` while a node of that identity delivers one (on a short lease); only that caller
reads and writes its own."""
CONTROLPLANES: Final = PREFIX + "controlplanes/"
"""<replica id>: each live control-plane replica's addresses (JSON), leased: where nodes fail over to."""
CONTROLPLANE_LEADER: Final = PREFIX + "controlplane-leader"
"""The replica id of the control-plane leader, under its lease (`hivemesh.controlplane.leader`)."""
CONTROLPLANE_KEYS: Final = PREFIX + "controlplane-keys"
"""The token signing keys every replica signs with (private: no role but etcd root reads it)."""
CONTROLPLANE_CA: Final = PREFIX + "controlplane-ca"
"""The root CA and its rotation state, keys included (`hivemesh.controlplane.shared_ca`; private like the keys)."""
STATE: Final = PREFIX + "state/"
"""<namespace>#<key>: shared-state documents (`hivemesh.controlplane.state_service`); only the control plane reads
or writes them, checking the `state` policies per namespace."""

AUDIT_LOG: Final = PREFIX + "audit-log/"
"""<20-digit first seq>: one committed batch of the mesh-wide audit log's entries (a JSON header line, then the
entry lines zlib-compressed: `hivemesh.controlplane.audit.batches`), in log order
(`hivemesh.controlplane.audit.shared_log`); a bounded window, trimmed by the leader. Control plane only."""
AUDIT_LOG_TAIL: Final = PREFIX + "audit-log-tail"
""""<seq> <hash>" of the audit log's last entry: every append compares and moves it in one transaction."""
AUDIT_CHECKPOINTS: Final = PREFIX + "audit-checkpoints/"
"""<20-digit number>: the audit log's signed checkpoints, written by the leader only (fenced by its term)."""
AUDIT_APPLIED: Final = PREFIX + "audit-applied/"
"""<replica id>: how far each live replica has applied the audit log (JSON), leased: what trimming waits for."""
AUDIT_CHECKPOINT_KEY: Final = PREFIX + "audit-checkpoint-key"
"""The audit checkpoint signing key every replica signs with (private: no role but etcd root reads it)."""

TERMINAL_RUN_STATES: Final = frozenset({"COMPLETED", "FAILED", "CANCELED", "REJECTED"})
"""The A2A task states (`hivemesh.v1.TaskState` names) a run's WORKFLOW_INDEX summary never leaves: what
retention may delete once it is old enough."""

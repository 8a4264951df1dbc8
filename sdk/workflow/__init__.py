"""Durable workflows: a pattern (or any async function) run with every step recorded as an event in etcd.

    async with WorkflowEngine(mesh) as engine:
        handle = await engine.submit("hivemesh.agents.research:RESEARCH", {"query": "leases"})
        state = await handle.result()        # WorkflowState: state, steps, output, tokens
        # elsewhere, after the orchestrator died:  hivemesh workflows resume <id>

**Ownership.** A run's id is `<kind>-<name>/<local>`: the workload identity that created it, then its own id
(`hivemesh.mesh.run_ids`). Its keys live under that owner's prefixes, which only that identity's etcd user
(and operators and the control plane) may read or write, so only it (or an operator) can resume a run.

**Event sourcing.** A run is the events under `/hivemesh/workflows/<id>/events/<seq>`; its state is rebuilt
by replaying them (`WorkflowState.replay`). `/hivemesh/workflow-index/<id>` is a read model (summary for
`list`), written in the same transaction as each event.

**Resume.** The definition is recorded as an import reference (`module:attr`, a pattern object or an async
function `(run, input)`), so any process with the code can resume a run: it replays the events and runs the
definition again. A step that completed returns its recorded result without calling; a step that failed
raises its recorded error; memoized decisions come back as recorded, so the run takes the same path. A step
that had started but not finished is sent again *with the same idempotency key*: an idempotent capability
just runs again, and the SDK server of a non-idempotent one joins or replays the first attempt, so its
effect happens once (`hivemesh.sdk.idempotency`).

**One owner.** A run is driven by whoever holds `/hivemesh/workflows/<id>/owner`, a key bound to a lease
(default TTL 5 s) that the owner keeps alive. A killed orchestrator's lease expires and another process may
resume; every event the owner writes is fenced on its owner value, so an owner that lost its lease cannot
write again. An owner that lost its lease (etcd paused or cut off) owns the run again once etcd answers and
replays it (`reown`), unless another process took it over meanwhile.

**Cancel.** `cancel_requested` is an event anyone may append; the owner watches its run's events, cancels
the body (which cancels its in-flight gRPC calls, and so the calls those agents made), withdraws its open
escalations, and records `canceled`. A run with no live owner is cancelled directly.

Task states are A2A's: SUBMITTED → WORKING ⇄ INPUT_REQUIRED → COMPLETED | FAILED | CANCELED | REJECTED.

Modules: `state` (the fold of events), `store` (etcd: events, read model, ownership), `definition` (import
references), `run` (the durable Runner), `engine` (submit, drive, resume, cancel), `reown` (owning a run again).
"""

from hivemesh.sdk.workflow.definition import definition_ref, resolve_definition
from hivemesh.sdk.workflow.engine import WorkflowEngine, WorkflowHandle
from hivemesh.sdk.workflow.run import JournalError, WorkflowRun, escalation_id_for
from hivemesh.sdk.workflow.state import StepInfo, WorkflowState
from hivemesh.sdk.workflow.store import LockLostError, OwnerLock, WorkflowStore, validate_workflow_id

__all__ = [
    "JournalError",
    "LockLostError",
    "OwnerLock",
    "StepInfo",
    "WorkflowEngine",
    "WorkflowHandle",
    "WorkflowRun",
    "WorkflowState",
    "WorkflowStore",
    "definition_ref",
    "escalation_id_for",
    "resolve_definition",
    "validate_workflow_id",
]

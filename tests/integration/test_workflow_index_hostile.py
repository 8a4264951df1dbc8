"""A workload's own run-index entries, written as it likes, against a real control plane and a real etcd with
mutual TLS and auth: `WorkflowStore.list` (what `resume_all`, `WorkflowEngine.list` and an operator's listing of
every run read) lists the real runs and leaves the bad entries out, never failing everyone's listing.

Before: an entry that was a list, had no id or state, or a created_at of "yesterday" raised in the listing's
sort (AttributeError, KeyError, ValueError) for every reader of that prefix, operators' included.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aetcd
import pytest

from hivemesh.mesh.etcd import client as etcd_client
from hivemesh.mesh.keyspace import WORKFLOW_INDEX
from hivemesh.sdk.workflow import WorkflowEngine, WorkflowRun, WorkflowStore
from tests.support.orch_env import Orch

pytestmark = pytest.mark.timeout(120)

OWNER = "client-mallory"


async def echo(run: WorkflowRun, input: Any) -> Any:
    return {"input": input}


def _entry(local: str, **fields: Any) -> dict[str, Any]:
    return {"id": f"{OWNER}/{local}", "state": "WORKING", "created_at": 1_700_000_000.0, **fields}


HOSTILE: dict[str, bytes] = {
    "a-list": b"[1]",
    "a-string": b'"WORKING"',
    "no-id": json.dumps({"state": "WORKING", "created_at": 1.0}).encode(),
    "no-state": json.dumps({"id": f"{OWNER}/no-state", "created_at": 1.0}).encode(),
    "state-a-number": json.dumps(_entry("state-a-number", state=7)).encode(),
    "created-yesterday": json.dumps(_entry("created-yesterday", created_at="yesterday")).encode(),
    "created-1e308": json.dumps(_entry("created-1e308", created_at=1e308)).encode(),
    "created-infinity": json.dumps(_entry("created-infinity", created_at=float("inf"))).encode(),  # "Infinity"
    "created-nan": json.dumps(_entry("created-nan", created_at=float("nan"))).encode(),  # "NaN"
    "created-true": json.dumps(_entry("created-true", created_at=True)).encode(),
    "created-none": json.dumps(_entry("created-none", created_at=None)).encode(),
    "another-run": json.dumps(_entry("real", definition="x" * 200_000)).encode(),  # names a run it is not
    "not-json": b"\xff\xfe{",
}


async def test_bad_index_entries_are_left_out_and_the_real_runs_listed(
        orch: Orch, etcd: aetcd.Client, caplog: pytest.LogCaptureFixture) -> None:
    mallory = await orch.client("mallory")
    async with WorkflowEngine(mallory) as engine:
        for local in ("real", "damaged"):
            assert (await (await engine.submit(echo, local, workflow_id=local)).result(timeout=20)).state \
                == "COMPLETED"
        # The workload's own etcd role writes its own index entries: anything, under any name of its prefix.
        own = etcd_client(mallory.node.etcd)
        try:
            for local, value in HOSTILE.items():
                await own.put(f"{WORKFLOW_INDEX}{OWNER}/{local}".encode(), value)
            await own.put(f"{WORKFLOW_INDEX}{OWNER}/bad-key-\xff".encode("latin-1"), b"{}")  # not UTF-8
            # A real run's entry overwritten: the run is still in its journal.
            await own.put(f"{WORKFLOW_INDEX}{OWNER}/damaged".encode(),
                          json.dumps(_entry("damaged", created_at="yesterday", state="X")).encode())
        finally:
            await own.close()

        caplog.set_level(logging.WARNING, logger="hivemesh.sdk.workflow.store")
        for listing in (engine.list(), WorkflowStore(etcd).list(), WorkflowStore(etcd).list(OWNER)):
            caplog.clear()
            runs = await listing
            assert [(r["id"], r["state"]) for r in runs] == [(f"{OWNER}/damaged", "COMPLETED"),
                                                             (f"{OWNER}/real", "COMPLETED")], runs
            assert len(runs[1]["definition"]) < 1000  # the real run's own summary, not the one naming it
            warned = [r.getMessage() for r in caplog.records if "left out of the list" in r.getMessage()]
            assert len(warned) == 1 and warned[0].startswith(f"{len(HOSTILE) + 1} workflow index entries"), warned
        assert await engine.resume_all() == []  # both finished: nothing to resume, and nothing raised

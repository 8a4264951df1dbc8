"""The retention selection rules (what is deleted when) and the settings' syntax, without etcd."""

from __future__ import annotations

from collections import deque

import pytest

from hivemesh.controlplane.retention import compaction_target, escalation_due, revocation_due, workflow_due
from hivemesh.controlplane.retention_config import RetentionConfig, parse_duration
from hivemesh.mesh.revocation import Revocation
from hivemesh.v1 import escalation_pb2 as E  # noqa: N812 - reads as the enum it is

NOW = 1_000_000.0
DAY = 86400.0


@pytest.mark.parametrize(("state", "age", "keep", "due"), [
    ("COMPLETED", 2 * DAY, DAY, True),
    ("FAILED", 2 * DAY, DAY, True),
    ("CANCELED", 2 * DAY, DAY, True),
    ("REJECTED", 2 * DAY, DAY, True),
    ("COMPLETED", DAY, DAY, True),  # exactly at the period
    ("COMPLETED", DAY - 1, DAY, False),  # not yet
    ("WORKING", 30 * DAY, DAY, False),  # never a run in progress, however old
    ("INPUT_REQUIRED", 30 * DAY, DAY, False),
    ("SUBMITTED", 30 * DAY, DAY, False),
    ("COMPLETED", 30 * DAY, None, False),  # keep forever
    ("COMPLETED", 0.0, 0.0, True),  # period 0: at the next pass
])
def test_workflow_rule(state: str, age: float, keep: float | None, due: bool) -> None:
    assert workflow_due({"state": state, "updated_at": NOW - age, "created_at": NOW - 40 * DAY}, NOW, keep) is due


def test_workflow_rule_ignores_entries_without_a_time() -> None:
    assert not workflow_due({"state": "COMPLETED"}, NOW, 0.0)
    assert not workflow_due({"state": "COMPLETED", "updated_at": "soon"}, NOW, 0.0)


def _esc(status: int, resolved_ago: float | None, created_ago: float = 40 * DAY) -> E.Escalation:
    esc = E.Escalation(id="e", status=status, created_at_unix_ms=int((NOW - created_ago) * 1000))  # type: ignore[arg-type]
    if resolved_ago is not None:
        esc.resolution.resolved_at_unix_ms = int((NOW - resolved_ago) * 1000)
    return esc


@pytest.mark.parametrize(("status", "resolved_ago", "run_open", "due"), [
    (E.ESCALATION_STATUS_APPROVED, 2 * DAY, False, True),
    (E.ESCALATION_STATUS_REJECTED, 2 * DAY, False, True),
    (E.ESCALATION_STATUS_CANCELED, 2 * DAY, False, True),
    (E.ESCALATION_STATUS_APPROVED, DAY / 2, False, False),  # resolved recently: kept
    (E.ESCALATION_STATUS_PENDING, None, False, False),  # never a pending one
    (E.ESCALATION_STATUS_APPROVED, 2 * DAY, True, False),  # an unfinished run may still need the answer
    (E.ESCALATION_STATUS_UNSPECIFIED, 2 * DAY, False, False),
])
def test_escalation_rule(status: int, resolved_ago: float | None, run_open: bool, due: bool) -> None:
    assert escalation_due(_esc(status, resolved_ago), NOW, DAY, run_open=run_open) is due


def test_escalation_rule_falls_back_to_creation_time_and_keeps_forever_when_told() -> None:
    assert escalation_due(_esc(E.ESCALATION_STATUS_REJECTED, None, created_ago=2 * DAY), NOW, DAY, run_open=False)
    assert not escalation_due(_esc(E.ESCALATION_STATUS_REJECTED, 300 * DAY), NOW, None, run_open=False)


@pytest.mark.parametrize(("expired_ago", "keep", "due"), [
    (2 * 3600, 3600, True),
    (1800, 3600, False),  # expired, but not long enough ago
    (-600, 0, False),  # still in force: never
    (10 * DAY, None, False),
])
def test_revocation_rule(expired_ago: float, keep: float | None, due: bool) -> None:
    rev = Revocation(jti="j", revoked_at=NOW - expired_ago - 330, expires_at=NOW - expired_ago)
    assert revocation_due(rev, NOW, keep) is due


def test_compaction_keeps_the_history_period_and_the_last_revisions() -> None:
    samples = deque([(NOW - 900, 100), (NOW - 700, 400), (NOW - 500, 900), (NOW - 100, 2000)])
    # 600 s of history: the newest sample at least 600 s old is revision 400.
    assert compaction_target(samples, NOW, 5000, 600, 1000) == 400
    # ...unless that would keep fewer than history_revisions.
    assert compaction_target(samples, NOW, 1200, 600, 1000) == 200
    # Nothing is old enough yet, or history kept forever: no compaction.
    assert compaction_target(deque([(NOW - 10, 100)]), NOW, 5000, 600, 1000) == 0
    assert compaction_target(samples, NOW, 5000, None, 1000) == 0
    assert compaction_target(deque(), NOW, 5000, 600, 0) == 0


def test_settings_syntax() -> None:
    assert RetentionConfig.parse("") == RetentionConfig()
    cfg = RetentionConfig.parse("workflows=1d, escalations=30d,history=10m,history-revisions=50,interval=5s")
    assert (cfg.workflows_s, cfg.escalations_s, cfg.history_s, cfg.history_revisions, cfg.interval_s) == (
        DAY, 30 * DAY, 600.0, 50, 5.0)
    assert cfg.revocations_s == RetentionConfig().revocations_s
    assert RetentionConfig.parse("workflows=never").workflows_s is None
    assert not RetentionConfig.parse("off").enabled
    assert parse_duration("90") == 90.0 and parse_duration("2h") == 7200.0
    for bad in ("workflows", "bogus=1d", "workflows=1w", "interval=never", "interval=0", "workflows=-1"):
        with pytest.raises(ValueError):
            RetentionConfig.parse(bad)

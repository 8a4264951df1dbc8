"""Retention settings: how long etcd keeps history, finished workflow runs, resolved escalations and stale
revocations (`hivemesh.controlplane.retention` applies them). Apart from the loop, so the control plane's
config can hold them without importing the feature services.

Given as `hivemesh controlplane --retention 'workflows=1d,escalations=30d'` or HIVEMESH_RETENTION; 'off' turns
retention off. Defaults and their reasons: docs/resilience.md ("Retention").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any, Final

_UNITS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_KEEP_FOREVER: Final = ("never", "forever", "off")
_NAMES: Final = {"interval": "interval_s", "history": "history_s", "history-revisions": "history_revisions",
                 "workflows": "workflows_s", "escalations": "escalations_s", "revocations": "revocations_s",
                 "batch": "batch", "audit-window": "audit_window_s", "audit-window-mb": "audit_window_mb"}


def parse_duration(text: str) -> float | None:
    """'90', '90s', '10m', '2h', '7d' -> seconds; 'never' / 'forever' / 'off' -> None (keep forever)."""
    t = text.strip().lower()
    if t in _KEEP_FOREVER:
        return None
    m = _DURATION.fullmatch(t)
    if m is None:
        raise ValueError(f"bad duration {text!r}: use a number with an optional unit s, m, h or d (or 'never')")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class RetentionConfig:
    """How long etcd keeps what (seconds; None: forever). The defaults suit a production mesh."""

    enabled: bool = True
    interval_s: float = 60.0
    """How often the loop runs."""
    history_s: float | None = 600.0
    """etcd revisions younger than this are never compacted (watchers and `watch --rev` can resume within it)."""
    history_revisions: int = 1000
    """...and neither are the newest this many revisions."""
    workflows_s: float | None = 7 * 86400.0
    """A finished workflow run is deleted this long after its last event."""
    escalations_s: float | None = 7 * 86400.0
    """A resolved escalation is deleted this long after its resolution."""
    revocations_s: float | None = 3600.0
    """A revocation entry is deleted this long after it stopped mattering (`expires_at`)."""
    batch: int = 1000
    """At most this many deletions of each kind per pass (bounds one pass's load on etcd)."""
    audit_window_s: float | None = 600.0
    """etcd keeps the mesh-wide audit log's batches this long once every live replica holds them: how long a
    replica may be down and still catch up by itself (`hivemesh.controlplane.audit.shared_log`)."""
    audit_window_mb: int = 256
    """...and never more than this many MiB of them, whatever the age (etcd's space is the mesh's)."""

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError("the retention interval must be > 0 s")
        if self.history_revisions < 0 or self.batch < 1:
            raise ValueError("history-revisions must be >= 0 and batch >= 1")
        if self.audit_window_mb < 1:
            raise ValueError("audit-window-mb must be >= 1")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_s") and value is not None and value < 0:
                raise ValueError(f"{f.name} must not be negative")

    @classmethod
    def parse(cls, text: str | None) -> RetentionConfig:
        """'workflows=1d,escalations=30d,history=10m' (unnamed settings keep their default); 'off' disables."""
        config = cls()
        if text is None or not text.strip():
            return config
        if text.strip().lower() in _KEEP_FOREVER:
            return replace(config, enabled=False)
        changes: dict[str, Any] = {}
        for item in text.split(","):
            name, sep, value = item.strip().partition("=")
            attr = _NAMES.get(name.strip().lower())
            if not sep or attr is None:
                raise ValueError(f"bad retention setting {item.strip()!r}: expected NAME=VALUE with NAME one of "
                                 f"{', '.join(_NAMES)}")
            if attr in ("history_revisions", "batch", "audit_window_mb"):
                changes[attr] = int(value)
            elif attr == "interval_s":
                seconds = parse_duration(value)
                if seconds is None:
                    raise ValueError("the retention interval cannot be 'never' (use 'off' to disable retention)")
                changes[attr] = seconds
            else:
                changes[attr] = parse_duration(value)
        return replace(config, **changes)

"""Prometheus file-based service discovery for the nodes `hivemesh up` starts.

Prometheus's `file_sd_configs` reads a JSON list of target groups and re-reads it when it changes; each group
carries the `job` and `node` labels the dashboards and alerts select on. Written to a temporary file and
renamed, so Prometheus never reads half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SD_FILE: Final = "prometheus/targets.json"
"""Where `hivemesh up` writes it, under its state folder."""


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    address: str
    """HOST:PORT serving /metrics."""
    job: str
    """controlplane, agent, sidecar or client."""
    node: str
    """The node's name (agent name, `controlplane`...)."""


def write_file_sd(path: Path, targets: Iterable[ScrapeTarget]) -> Path:
    """Write targets as a file_sd JSON file at path (atomically); returns path."""
    groups = [{"targets": [t.address], "labels": {"job": t.job, "node": t.node}} for t in targets]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(groups, indent=2) + "\n")
    os.replace(tmp, path)
    return path

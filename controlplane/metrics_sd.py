"""Prometheus file-based service discovery for the nodes `hivemesh up` starts, and the nodes that publish
their metrics address in their status entry (`NodeTraffic.metrics_address`: any node joined to the mesh).

Prometheus's `file_sd_configs` reads JSON lists of target groups and re-reads them when they change. The
files match deploy/prometheus/prometheus.yml: `nodes.json` for the `hivemesh` job (agents, sidecars,
clients), `controlplane.json` for `hivemesh-controlplane`; each group carries the `job` and `node` labels
the dashboards and alerts select on. Each is written to a temporary file and renamed, so Prometheus never
reads half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from hivemesh.controlplane.livestats import parse_endpoint
from hivemesh.mesh.pki import parse_spiffe_id
from hivemesh.v1 import policy_pb2

SD_DIR: Final = "prometheus"
"""Where `hivemesh up` writes them, under its state folder."""
JOB_NODES: Final = "hivemesh"
JOB_CONTROLPLANE: Final = "hivemesh-controlplane"
FILES: Final = {JOB_NODES: "nodes.json", JOB_CONTROLPLANE: "controlplane.json"}


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    address: str
    """HOST:PORT serving /metrics."""
    job: str
    """JOB_NODES or JOB_CONTROLPLANE."""
    node: str
    """The node's name (agent name, `controlplane`...)."""

    def __post_init__(self) -> None:
        if self.job not in FILES:
            raise ValueError(f"job must be one of {sorted(FILES)}: {self.job!r}")


def write_file_sd(folder: Path, targets: Iterable[ScrapeTarget]) -> list[Path]:
    """Write targets into folder as one file_sd JSON file per job (each atomically); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    by_job: dict[str, list[dict[str, object]]] = {job: [] for job in FILES}
    for t in targets:
        by_job[t.job].append({"targets": [t.address], "labels": {"job": t.job, "node": t.node}})
    paths = []
    for job, groups in by_job.items():
        path = folder / FILES[job]
        tmp = folder / f".{FILES[job]}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(groups, indent=2) + "\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def targets_from_status(nodes: Iterable[policy_pb2.NodeTraffic]) -> list[ScrapeTarget]:
    """A JOB_NODES target per node whose published status names its metrics address (`hivemesh status`'s entries:
    an SDK agent or client started by hand is in them too, while only `hivemesh up` writes the file_sd files).

    The node label is the name in its SPIFFE id. An address that is no HOST:PORT, or a wildcard host (not an
    address to connect to: the node listens on every interface), is skipped rather than handed to a scraper."""
    found: dict[str, ScrapeTarget] = {}
    for n in nodes:
        try:
            address = parse_endpoint(n.metrics_address).address
            name = parse_spiffe_id(n.identity).name
        except ValueError:
            continue
        if address.rpartition(":")[0] in ("0.0.0.0", "[::]"):
            continue
        found.setdefault(address, ScrapeTarget(address, JOB_NODES, name))
    return list(found.values())

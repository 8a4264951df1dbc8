"""The mesh's metric catalog against what Prometheus does to the series it scrapes, and against its documentation.

Prometheus sets `job` and `instance` on every series it scrapes: a metric's own label of either name is renamed
`exported_job` / `exported_instance`, and every query grouping by it then groups by scrape target. The breaker's
label was `instance`, so the alert said "circuit open for 127.0.0.1:19464" (tests/integration/
test_observability_review.py shows it through a real Prometheus)."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from hivemesh.mesh.metrics import STATE, MeshMetrics

REPO = Path(__file__).resolve().parents[2]
SCRAPE_LABELS = {"job", "instance"}
"""What Prometheus itself sets on every scraped series."""
DISCOVERY_LABELS = {"node"}
"""What the mesh's own discovery (`hivemesh up`'s files, prometheus-k8s.yml) sets on every target."""


def _label_names() -> dict[str, tuple[str, ...]]:
    """Every family a node exports -> its label names: the state families from the catalog, the rest from the
    collectors of a real MeshMetrics (counters and histograms have no sample before their first call)."""
    m = MeshMetrics(packaging="catalog", node="catalog")
    found = {name: spec.labels for name, spec in STATE.items()}
    for part in (m.red, m.events):
        for metric in vars(part).values():
            if isinstance(metric, MetricWrapperBase):
                found[metric._name] = tuple(metric._labelnames)
    for family in m.registry.collect():
        for s in family.samples:
            found.setdefault(family.name, tuple(s.labels))
    return found


def test_no_metric_has_a_label_prometheus_sets_on_every_scrape() -> None:
    names = _label_names()
    assert len(names) > 40 and names["hivemesh_breaker_state"][0] == "capability"
    clashing = {family: sorted(set(labels) & SCRAPE_LABELS) for family, labels in names.items()
                if set(labels) & SCRAPE_LABELS}
    assert not clashing, f"renamed exported_* by every scrape: {clashing}"
    # The discovery's `node`: on hivemesh_node_info only, stored as exported_node (docs/metrics.md says so).
    assert {family for family, labels in names.items() if set(labels) & DISCOVERY_LABELS} == {"hivemesh_node_info"}


def test_the_catalog_table_lists_each_state_familys_labels() -> None:
    """docs/metrics.md's table row of every family read from state names that family's labels, in order."""
    doc = (REPO / "docs" / "metrics.md").read_text()
    rows = dict(re.findall(r"^\| `(hivemesh_\w+)` \| \w+ \|([^|]*)\|", doc, re.MULTILINE))
    for name, spec in STATE.items():
        shown = name + "_total" if spec.counter else name
        assert shown in rows, shown
        documented = tuple(label.strip() for label in rows[shown].split(",") if label.strip())
        assert documented == spec.labels, (name, documented, spec.labels)
    assert "no hivemesh metric has a `job` or\n`instance` label" in doc

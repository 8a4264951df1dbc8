"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """For the CLI run in-process (`tests.support.cli_offline.hivemesh`): tmp_path, holding the CLI's state folder
    (`home`) and an empty certs folder (`certs`), with no mesh settings from the environment (HIVEMESH_HOME, which
    the root group sets, is restored after)."""
    monkeypatch.setenv("HIVEMESH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))  # no mesh this user runs changes the advice
    for name in ("HIVEMESH_CERTS", "HIVEMESH_ETCD", "HIVEMESH_CONTROLPLANE", "HIVEMESH_JOIN", "HIVEMESH_CA"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "certs").mkdir()
    yield tmp_path

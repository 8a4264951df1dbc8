"""The shared CA document's folder mirror: what a replica writes when another replica ran a rotation step."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivemesh.controlplane import shared_ca
from hivemesh.controlplane.ca import init_ca
from hivemesh.controlplane.ca_rotation import CaRotation
from hivemesh.mesh.errors import FailedPreconditionError


def test_mirror_makes_a_folder_hold_exactly_the_document(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    init_ca(a, "example.org")
    init_ca(b, "example.org")  # another CA: every shared file differs
    CaRotation(a).step("prepare")
    doc = shared_ca.snapshot(a)
    assert set(doc) == {"ca.pem", "ca.key", "ca-next.pem", "ca-next.key", "rotation.json"}
    assert len(shared_ca.roots_of(doc)) == 2

    assert shared_ca.mirror(doc, b) is True
    assert shared_ca.snapshot(b) == doc
    for key in ("ca.key", "ca-next.key"):
        assert (b / key).stat().st_mode & 0o777 == 0o600, key
    assert shared_ca.mirror(doc, b) is False  # unchanged: nothing rewritten
    assert (b / "operator.pem").read_bytes() != (a / "operator.pem").read_bytes()  # the folder's own stay its own

    CaRotation(a).step("activate")  # ca-next.* become ca.*, the old root moves to ca-prev.*
    assert shared_ca.mirror(shared_ca.snapshot(a), b) is True
    assert not (b / "ca-next.key").exists() and (b / "ca-prev.key").exists()
    assert CaRotation(b).state.phase == "activated"


def test_an_unreadable_document_is_a_clear_failed_precondition() -> None:
    for raw in (b"not json", b'{"files": {"ca.pem": "x"}}', b'{"files": []}'):
        with pytest.raises(FailedPreconditionError, match="controlplane-ca"):
            shared_ca._parse(raw)

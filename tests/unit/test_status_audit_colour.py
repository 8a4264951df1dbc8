"""`hivemesh status`'s colour for a node's TLS handshake audit, whose state names a second port (the direct-link
port) where that port's audit differs from the gRPC port's (`HandshakeAudit.add_to_status`)."""

from __future__ import annotations

import pytest

from hivemesh.controlplane.cli.policy import _audit_colour


@pytest.mark.parametrize(("state", "colour"), [
    ("live", "green"),
    ("starting", "yellow"),
    ("off: the probe connection's refusal was not seen within 15 s", "red"),
    ("live; port 7445: starting", "yellow"),  # both audits work; the direct port's probe is still out
    ("starting; port 7445: live", "yellow"),
    ("live; port 7445: off: the probe failed: a; b", "red"),
    ("off: not enabled in this process: an embedded agent (a; b); port 7445: live", "red"),
])
def test_a_state_is_coloured_by_its_worst_port(state: str, colour: str) -> None:
    assert _audit_colour(state) == colour

"""How a MeshClient reads an agent's answer (`sdk/client.py`): JSON as json reads it, and a clear error for bad JSON."""

from __future__ import annotations

import pytest

from hivemesh.mesh.errors import AgentError
from hivemesh.sdk.client import _decode_output


def test_an_answer_is_read_as_json_and_bad_json_is_a_clear_agent_error() -> None:
    assert _decode_output(b'{"text":"hi","n":18446744073709551616}', "application/json") == {
        "text": "hi", "n": 18446744073709551616}  # beyond 64 bits: still an int, as json reads it
    assert _decode_output(b"", "application/json") is None
    assert _decode_output(b"\x00raw", "application/octet-stream") == b"\x00raw"  # not JSON: the bytes as sent
    with pytest.raises(AgentError, match="answered with invalid JSON"):
        _decode_output(b'{"text":', "application/json")
    with pytest.raises(AgentError, match="nested too deeply"):  # was a bare RecursionError
        _decode_output(b"[" * 100_000 + b"]" * 100_000, "application/json")

"""JSON (and YAML) nested past what the parser can read, from every party that can send it: refused as malformed
input is, with the same clear error, never a RecursionError escaping to become an UNKNOWN status or a lost record.

Python's json and PyYAML read nesting recursively, so a few kilobytes of `[` exhaust the interpreter's stack:
they raise RecursionError, which is not a ValueError. (From Python 3.12 json's C recursion has a limit of its own,
~10,000 levels; every reader goes through `hivemesh.mesh.json_depth`, which raises it past 900 on every
interpreter.) The input guard always caught it; the parsers of tokens,
payload signatures, tool arguments, A2A messages, state values, escalation answers and policy texts did not
(the end-to-end refusals and their audit records are in tests/integration/test_negative_matrix.py)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from a2a.helpers import new_text_part
from a2a.types import Message, Role

from hivemesh.controlplane.escalations import _check_json
from hivemesh.controlplane.grants import parse_grants_text
from hivemesh.controlplane.policies import parse_documents
from hivemesh.controlplane.state_service import _decode
from hivemesh.mesh import json_depth
from hivemesh.mesh.audit.record import _unverified_token_ids
from hivemesh.mesh.controlplane_endpoints import Advert
from hivemesh.mesh.errors import InvalidInputError, SignatureInvalidError, TokenInvalidError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.policy import PolicyError
from hivemesh.mesh.resilience.kinds import ROUTES
from hivemesh.mesh.schema import SchemaError, compile_schema
from hivemesh.mesh.signing import verify
from hivemesh.mesh.tokens import KeySet, TokenVerifier
from hivemesh.mesh.trustdoc import verify_jwks, verify_trust_doc
from hivemesh.sdk.a2a.cards import _schema
from hivemesh.sdk.a2a.executor import payload_of
from hivemesh.sdk.llm.core import ToolCall
from hivemesh.sdk.tools import _run_call, tool, tool_parameters

DEPTH = 1_500
"""Past json's reach at the default recursion limit (~1,000 frames), and still small: 3 kB of text."""
DEEP = "[" * DEPTH + "]" * DEPTH
DEEP_YAML = "a: " + DEEP


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_the_depth_is_past_what_json_and_yaml_read() -> None:
    """On 3.11 json refuses it itself; from 3.12 it reads it, and the mesh's bound (`json_depth`) refuses it."""
    import yaml

    with pytest.raises(RecursionError):
        json_depth.loads(DEEP)
    with pytest.raises(RecursionError):
        yaml.safe_load(DEEP_YAML)
    json_depth.loads("[" * 200 + "]" * 200)  # and well below it, read: the refusals below are about depth


def test_a_token_whose_header_nests_too_deep_is_invalid() -> None:
    verifier = TokenVerifier(KeySet(), issuer="spiffe://t/controlplane", audience="spiffe://t/agent/a")
    token = f"{_b64(DEEP.encode())}.{_b64(b'{}')}.{_b64(b'x' * 64)}"
    with pytest.raises(TokenInvalidError, match="header is not valid JSON"):
        verifier.authenticate(token)


def test_a_jwks_that_nests_too_deep_is_refused_keeping_the_old_keys() -> None:
    keys = KeySet()
    with pytest.raises(ValueError, match="not valid JSON"):
        keys.update_from_jwks(DEEP)


def test_a_refused_tokens_claims_that_nest_too_deep_leave_the_audit_record_without_them() -> None:
    header = _b64(json.dumps({"alg": "ES256"}).encode())
    token = f"{header}.{_b64(DEEP.encode())}.{_b64(b'x' * 64)}"
    call = Inbound(method="Invoke", request=None, wire_size=0, metadata={"authorization": f"Bearer {token}"},
                   auth_context={})
    assert _unverified_token_ids(call) == {}


def test_a_payload_signature_whose_header_nests_too_deep_is_invalid() -> None:
    with pytest.raises(SignatureInvalidError, match="not valid base64url JSON"):
        verify(f"{_b64(DEEP.encode())}..{_b64(b'x' * 64)}", "hivemesh-request+jws", b"\0" * 32)


def test_tool_arguments_that_nest_too_deep_are_an_error_for_the_model() -> None:
    @tool
    def echo(text: str) -> str:
        """Echo the text."""
        return text

    ok, content = asyncio.run(_run_call(ToolCall(id="c1", name="echo", arguments=DEEP), {"echo": echo}, None))
    assert not ok and "InvalidArguments" in content


def test_a_card_schema_too_deep_for_tool_parameters_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):  # any agent's card can carry one
        tool_parameters(DEEP)


def test_a2a_text_that_nests_too_deep_is_plain_text() -> None:
    message = Message(role=Role.ROLE_USER, message_id="m", parts=[new_text_part(DEEP)])
    assert payload_of(message) == {"text": DEEP}


@pytest.mark.parametrize(("parse", "expected"), [
    (lambda: _schema(DEEP), {}),  # a card's schema text
    (lambda: _decode(b'{"v": "1", "by": ' + DEEP.encode() + b"}"), {"v": "null"}),  # a damaged stored state
    (lambda: _decode(DEEP.encode()), {"v": "null"}),
    (lambda: Advert.from_json(DEEP.encode()), None),  # a control plane's advert in etcd
])
def test_stored_or_advertised_json_that_nests_too_deep_reads_as_damaged(
    parse: Callable[[], Any], expected: Any
) -> None:
    assert parse() == expected


@pytest.mark.parametrize("check", [
    lambda: _check_json(DEEP, "answer_json"),
    lambda: parse_documents(DEEP_YAML, source="policies.yaml"),
    lambda: parse_documents(DEEP, source="policies.json"),
    lambda: parse_grants_text(DEEP_YAML, source="grants.yaml"),
])
def test_operator_and_agent_texts_that_nest_too_deep_are_invalid_input(check: Callable[[], Any]) -> None:
    with pytest.raises(InvalidInputError, match="nested too deeply"):
        check()


def test_a_stored_policy_that_nests_too_deep_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="not JSON"):
        ROUTES.load("r", DEEP.encode())


def test_a_card_schema_that_nests_too_deep_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="nested too deeply"):
        compile_schema(DEEP, where="capability echo input")
    with pytest.raises(SchemaError, match="Recursion limit"):  # within json's reach, past jsonschema's own
        compile_schema('{"items":' * 600 + "{}" + "}" * 600, where="capability echo input")


@pytest.mark.parametrize("verify_doc", [verify_trust_doc, verify_jwks])
def test_signed_trust_documents_that_nest_too_deep_are_refused(verify_doc: Callable[[bytes, bytes], Any]) -> None:
    with pytest.raises(ValueError, match="not JSON"):
        verify_doc(DEEP.encode(), b"")


def test_a_policy_spec_sent_to_apply_policies_nested_too_deep_is_invalid_input() -> None:
    """ApplyPolicies reads each document's spec_json itself (the YAML loader reads files, not this field): it
    caught only JSONDecodeError, so the RPC answered INTERNAL with a RecursionError in the control plane's log."""
    from hivemesh.controlplane.policy_service import _raw_document
    from hivemesh.v1 import policy_pb2

    with pytest.raises(InvalidInputError, match="spec_json: nested too deeply") as refused:
        _raw_document(policy_pb2.Policy(kind="slo", name="s", spec_json=DEEP), "policies[0].")
    assert refused.value.field_violations == {"policies[0].spec_json": "nested too deeply"}

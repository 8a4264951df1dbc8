"""Naming the output screen's classifier (hivemesh.mesh.layers.output_classifier): a `module:callable` is
loaded when the configuration is made (AgentServerConfig, SidecarConfig, `python -m hivemesh.agents.run`), a bad
name is refused saying why, and a classifier that fails or returns nonsense withholds the answer."""

from __future__ import annotations

import json

import pytest

from hivemesh.agents.run import main as run_agent
from hivemesh.mesh.errors import OutputScreenedError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.layers.output_classifier import load_classifier, resolve_classifier
from hivemesh.mesh.layers.output_screen import Span, output_screen_layer
from hivemesh.mesh.sidecar import SidecarConfig
from hivemesh.sdk import AgentServerConfig
from hivemesh.v1 import agent_pb2

SUPPORT = "tests.support.classifiers"


def _redact(classify: object, output: dict[str, str]) -> dict[str, str]:
    layer = output_screen_layer([agent_pb2.Capability(name="c", output_screen=agent_pb2.OUTPUT_SCREEN_REDACT)],
                                classify)  # type: ignore[arg-type]
    assert layer is not None
    call = Inbound(method="Invoke", request=agent_pb2.InvokeRequest(capability="c"), wire_size=0, metadata={},
                   auth_context={})
    answer = layer.answer(call, agent_pb2.InvokeResponse(output=json.dumps(output).encode(),
                                                         content_type="application/json"))
    return dict(json.loads(answer.output))


def test_a_named_classifier_is_loaded_and_used_by_the_output_screen() -> None:
    classify = load_classifier(f"{SUPPORT}:with_project_codes")
    assert _redact(classify, {"note": "PRJ-1234 for ops@example.com", "ok": "PRJ-12"}) == {
        "note": "[REDACTED:project-code] for [REDACTED:email]", "ok": "PRJ-12"}
    # A class is made without arguments; a dotted name reaches into the module.
    pattern = load_classifier("hivemesh.mesh.layers.output_screen:PatternClassifier")
    assert [s.rule for s in pattern("mail ops@example.com")] == ["email"]
    assert load_classifier("hivemesh.mesh.layers.output_screen:DEFAULT_CLASSIFIER.__call__")("x") == []
    assert resolve_classifier(None) is None
    direct = resolve_classifier(lambda text: [Span("all", 0, len(text))])
    assert direct is not None and direct("abc") == [Span("all", 0, 3)]


@pytest.mark.parametrize(("ref", "says"), [
    ("tests.support.classifiers", "package.module:callable"),
    ("tests.support.classifiers:", "package.module:callable"),
    ("tests/support/classifiers.py:broken", "package.module:callable"),
    ("tests.support.no_such_module:classify", "cannot import 'tests.support.no_such_module'"),
    (f"{SUPPORT}:nothing_here", "has no 'nothing_here'"),
    (f"{SUPPORT}:NOT_CALLABLE", "int is not callable"),
    (f"{SUPPORT}:NeedsArguments", "cannot be made without arguments"),
])
def test_a_bad_name_is_refused_saying_why(ref: str, says: str) -> None:
    with pytest.raises(ValueError, match="output classifier") as bad:
        load_classifier(ref)
    assert says in str(bad.value)
    with pytest.raises(ValueError, match="output classifier"):  # where it is written, not on the first answer
        AgentServerConfig(output_classifier=ref)
    with pytest.raises(ValueError, match="output classifier"):
        SidecarConfig(agent="127.0.0.1:7001", output_classifier=ref)
    with pytest.raises(ValueError, match="a callable or a 'module:callable'"):
        resolve_classifier(42)  # type: ignore[arg-type]


def test_the_reference_agent_runner_refuses_a_bad_name_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        run_agent(["storage", "--output-classifier", f"{SUPPORT}:nothing_here"])
    assert stopped.value.code == 2
    assert "output classifier 'tests.support.classifiers:nothing_here'" in capsys.readouterr().err


def test_a_classifier_that_fails_or_returns_nonsense_withholds_the_answer() -> None:
    for name, why in (("broken", r"failed \(ConnectionError\)"), ("out_of_bounds", "not a Span inside the text")):
        with pytest.raises(OutputScreenedError, match=why) as withheld:
            _redact(load_classifier(f"{SUPPORT}:{name}"), {"text": "secret"})
        assert withheld.value.reason == "OUTPUT_SCREENED" and "secret" not in withheld.value.message
        assert withheld.value.metadata["classifier"] == f"{SUPPORT}:{name}"
    config = AgentServerConfig(output_classifier=f"{SUPPORT}:with_project_codes")
    assert config.classifier is not None and [s.rule for s in config.classifier("PRJ-0001")] == ["project-code"]
    assert AgentServerConfig().classifier is None  # the front door's default: the pattern classifier

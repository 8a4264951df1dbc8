"""The fence layer alone: which `hivemesh-fence` headers it refuses, and why (the registration side of the
judgement is `Registration.fence_problem`, tested against a real etcd in tests/e2e/test_registry.py)."""

from __future__ import annotations

import pytest

from hivemesh.mesh.errors import InvalidInputError, StaleRegistrationError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.layers.fence import FENCE_HEADER, FenceLayer, parse_fence


def _call(**metadata: str) -> Inbound:
    return Inbound(method="Invoke", request=None, wire_size=0, metadata=metadata, auth_context={})


def _fenced(value: str) -> Inbound:
    return Inbound(method="Invoke", request=None, wire_size=0, metadata={FENCE_HEADER: value}, auth_context={})


@pytest.mark.parametrize("value", ["", "0", "-3", "+3", " 3", "3 ", "0x10", "1e3", "3.0", "\u0663", "9" * 20,
                                   str(2**63), "1;2"])
def test_a_malformed_fence_is_invalid_input_naming_the_header(value: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_fence(value)
    assert FENCE_HEADER in info.value.field_violations
    layer = FenceLayer()
    layer.follow(lambda _fence: None)
    with pytest.raises(InvalidInputError):  # malformed is not stale
        layer.check(_fenced(value))


def test_a_well_formed_fence_is_its_revision() -> None:
    assert parse_fence("1") == 1 and parse_fence(str(2**63 - 1)) == 2**63 - 1 and parse_fence("0042") == 42


def test_an_unfenced_call_passes_whatever_the_registration() -> None:
    layer = FenceLayer()
    layer.check(_call(authorization="Bearer t"))  # not registered yet
    layer.follow(lambda _fence: "never asked")
    layer.check(_call())


def test_a_fenced_call_passes_only_when_the_registration_says_it_is_its_own() -> None:
    layer = FenceLayer()
    with pytest.raises(StaleRegistrationError, match="not registered yet"):
        layer.check(_fenced("7"))  # serving before registering: no fenced call is for this process yet
    asked: list[int] = []

    def problem(fence: int) -> str | None:
        asked.append(fence)
        return None if fence == 9 else f"routed by revision {fence}; this one is 9"

    layer.follow(problem)
    layer.check(_fenced("9"))
    with pytest.raises(StaleRegistrationError, match="routed by revision 7") as info:
        layer.check(_fenced("7"))
    assert info.value.metadata == {"fence": "7"} and info.value.reason == "STALE_REGISTRATION"
    assert asked == [9, 7]
    layer.follow(None)  # following no registration
    with pytest.raises(StaleRegistrationError):
        layer.check(_fenced("9"))

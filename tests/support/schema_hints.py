"""A check the SDK hint tests share: a capability whose parameter has a hint no schema can say is refused where it
is defined, with a TypeError naming the capability, the parameter and what is wrong."""

from __future__ import annotations

from typing import Any

import pytest

from hivemesh.sdk import Agent, capability


def assert_refused_at_definition(hint: Any, words: tuple[str, ...]) -> None:
    """Defining a capability whose `value` parameter is hinted hint raises a TypeError naming the capability, the
    parameter, and each of words."""

    async def handler(self: Agent, value: int) -> int:
        return value

    handler.__annotations__ = {"value": hint, "return": "int"}
    with pytest.raises(TypeError) as refused:
        capability(handler)
    text = str(refused.value)
    assert "capability" in text and "handler" in text and "parameter 'value'" in text, text
    assert all(word in text for word in words), (words, text)

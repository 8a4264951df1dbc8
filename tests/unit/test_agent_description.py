"""An agent's card describes the agent with its `description`, else its own class docstring's first paragraph, else
nothing: never a docstring it inherits (a class without one advertised the SDK base class's "Base class of SDK
agents. Subclasses set `name` ..." in Describe and Mesh.Resolve)."""

from __future__ import annotations

from hivemesh.sdk.agent import Agent, capability


class Undocumented(Agent):
    name = "undocumented"

    @capability()
    async def echo(self, data: dict[str, str]) -> dict[str, str]:
        return data


class Documented(Agent):
    """Quotes prices from the catalogue.

    Details for readers of the code, not for the card.
    """

    name = "documented"

    @capability()
    async def echo(self, data: dict[str, str]) -> dict[str, str]:
        return data


class UndocumentedChild(Documented):
    name = "child"


class Described(Undocumented):
    """Not this."""

    description = "the attribute wins"


def test_an_agent_without_a_docstring_has_an_empty_description() -> None:
    assert Undocumented().card().description == ""


def test_the_description_is_the_first_paragraph_of_the_class_own_docstring() -> None:
    assert Documented().card().description == "Quotes prices from the catalogue."
    assert UndocumentedChild().card().description == ""  # its base's docstring is not its own


def test_the_description_attribute_comes_first() -> None:
    assert Described().card().description == "the attribute wins"

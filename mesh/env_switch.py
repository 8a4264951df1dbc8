"""On/off settings a caller may give or leave to the environment (HIVEMESH_LINK, HIVEMESH_LINK_DIRECT)."""

from __future__ import annotations

import os

_OFF = ("0", "false", "off", "no")
_ON = ("", "1", "true", "on", "yes")


def env_switch(name: str, value: bool | None) -> bool:
    """value if given, else $name ("1"/"true"/"on"/"yes" or "0"/"false"/"off"/"no"), else on. ValueError, naming
    the variable and what it takes, for anything else: a typo must not turn a feature off unnoticed."""
    if value is not None:
        return value
    raw = os.environ.get(name, "").strip().lower()
    if raw in _OFF:
        return False
    if raw in _ON:
        return True
    raise ValueError(f"{name} must be 1/true/on or 0/false/off: {raw!r}")

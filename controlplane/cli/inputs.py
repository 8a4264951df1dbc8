"""Files (and stdin) the CLI reads for a command, read bounded: at most one byte past the limit is ever read,
so `-f /dev/zero`, or a pipe that never ends, is refused at the limit instead of filling memory until a
MemoryError. A refusal is a usage mistake: one line naming the source, exit code 2."""

from __future__ import annotations

import sys

import click

__all__ = ["read_text"]


def read_text(path: str, *, limit: int, param_hint: str, stdin_dash: bool = False) -> tuple[str, str]:
    """(the UTF-8 text of path, how to name it); `-` is stdin when stdin_dash. click.BadParameter (exit 2)
    naming the source when it cannot be read, holds more than limit bytes, or is not UTF-8."""
    source = "<stdin>" if stdin_dash and path == "-" else path
    try:
        if source == "<stdin>":
            raw = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as f:
                raw = f.read(limit + 1)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {source}: {exc.strerror or exc}", param_hint=param_hint) from None
    if len(raw) > limit:
        raise click.BadParameter(f"{source} is larger than {limit:,} bytes: refusing to read it",
                                 param_hint=param_hint)
    try:
        return raw.decode("utf-8"), source
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{source} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})",
                                 param_hint=param_hint) from None

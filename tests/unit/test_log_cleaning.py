"""Text log lines (`hivemesh.mesh.logjson`, the CLI's `-v` and the servers' logs) show control and bidi characters
as escapes: a logged value carrying ESC sequences (an agent's name, a remote's error text) reached the operator's
terminal raw, where it could set the window title, clear the screen or reorder what the line shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from hivemesh.mesh.text_clean import UNSAFE, clean

EVIL = "c\x1b]0;pwned\x07\x1b[2J\u202eX\x9b31m\x7f"
SHOWN = "c\\x1b]0;pwned\\x07\\x1b[2J\\u202eX\\x9b31m\\x7f"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    env.update(extra)
    return env


def _cli(tmp_path: Path, certs: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process: `certs init` logs (at INFO, so under -v) the certs folder it was given."""
    return subprocess.run(
        [sys.executable, "-m", "hivemesh.controlplane.cli", "-v", "--home", str(tmp_path / "home"), "--certs-dir",
         certs, "certs", "init"],
        capture_output=True, text=True, encoding="utf-8", errors="surrogateescape", env=_env(**env), cwd=tmp_path,
        timeout=120, check=False,
    )


def test_cli_verbose_log_lines_show_controls_as_escapes(tmp_path: Path) -> None:
    """`hivemesh -v` logs the folder with its ESC, BEL, CSI, DEL and bidi override written as escapes; the same
    command with a plain folder logs the line as it always did; JSON lines are ASCII, every other character
    escaped, and keep the value exact."""
    done = _cli(tmp_path, str(tmp_path / EVIL))
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if "initialised CA" in x)
    assert line.endswith(f"INFO hivemesh.controlplane.ca: initialised CA for hivemesh.local in {tmp_path}/{SHOWN}")
    assert not UNSAFE.search(done.stderr.replace("\n", "")), repr(done.stderr)

    plain = _cli(tmp_path, str(tmp_path / "plain-certs"))
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr.endswith(f"INFO hivemesh.controlplane.ca: initialised CA for hivemesh.local in "
                                 f"{tmp_path}/plain-certs\n"), plain.stderr

    as_json = _cli(tmp_path, str(tmp_path / (EVIL + "-json")), HIVEMESH_LOG_FORMAT="json")
    assert as_json.returncode == 0, as_json.stderr
    raw = next(x for x in as_json.stderr.splitlines() if "initialised CA" in x)
    assert raw.isascii() and not UNSAFE.search(raw), repr(raw)  # C1, DEL and bidi too, as \\u escapes
    record = json.loads(raw)
    assert record["message"] == f"initialised CA for hivemesh.local in {tmp_path}/{EVIL}-json"


_LOGGING = textwrap.dedent('''
    import logging, sys
    from hivemesh.mesh.logjson import TEXT_FORMAT, basic_config

    basic_config(logging.INFO)  # the servers' and the CLI's: a handler on stderr
    raw = logging.StreamHandler(sys.stdout)  # logging's own text line, for comparison; on the named logger, so it
    raw.setFormatter(logging.Formatter(TEXT_FORMAT))  # formats (and caches the traceback) before the root's does
    log = logging.getLogger("hivemesh.test")
    log.addHandler(raw)
    value = sys.argv[1]

    def fail(why):
        raise RuntimeError(why)

    for text in ("normal", value):
        log.warning("agent %s answered %d", text, 7)
        try:
            fail(f"remote said: {text}")
        except RuntimeError:
            log.exception("call to %s failed", text)
        log.info("where %s", text, stack_info=True)
    log.warning("forged\\n2026-01-01 00:00:00,000 ERROR hivemesh: not from the mesh\\tend")
''')


def test_basic_config_text_lines_clean_message_traceback_and_stack(tmp_path: Path) -> None:
    """Through the handler `basic_config` sets up: normal records, with a traceback and a stack, come out exactly as
    logging's own text line writes them; a value with controls is escaped in the message and in the exception's
    text (the traceback keeps its own newlines), though another handler cached the raw traceback first; a newline
    in a message cannot forge a second line."""
    done = subprocess.run([sys.executable, "-c", _LOGGING, EVIL], capture_output=True, text=True, encoding="utf-8",
                          env=_env(), cwd=tmp_path, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    ours, raw = done.stderr, done.stdout
    start = ours.index(f"agent {SHOWN}")
    start_raw = raw.index(f"agent {EVIL}")
    assert ours[:start].endswith(" hivemesh.test: ") and ours[:start] == raw[:start_raw]  # the normal records: same
    evil = ours[start:]
    assert not UNSAFE.search(evil.replace("\n", "")), repr(evil)
    assert evil.startswith(f"agent {SHOWN} answered 7\n")
    assert f"call to {SHOWN} failed\nTraceback (most recent call last):\n" in evil
    assert f"RuntimeError: remote said: {SHOWN}\n" in evil
    assert f"where {SHOWN}\nStack (most recent call last):\n" in evil
    assert evil.count("\n") == raw[start_raw:].count("\n") - 1  # every line break but the forged one
    assert evil.endswith("forged\\x0a2026-01-01 00:00:00,000 ERROR hivemesh: not from the mesh\\x09end\n")
    assert evil.replace(SHOWN, EVIL).replace("\\x0a", "\n").replace("\\x09", "\t") == raw[start_raw:]


def test_clean_shows_each_unsafe_character_and_leaves_the_rest() -> None:
    assert clean(EVIL) == SHOWN
    assert clean("tab\there\nline", layout=True) == "tab\there\nline"
    assert clean("tab\there\nline") == "tab\\x09here\\x0aline"
    assert clean("plain text, ümlaut, 漢字, emoji \U0001f600") == "plain text, ümlaut, 漢字, emoji \U0001f600"
    assert clean("\u200b\u2066\ufeff\ud800") == "\\u200b\\u2066\\ufeff\\ud800"
    assert clean(42) == "42"

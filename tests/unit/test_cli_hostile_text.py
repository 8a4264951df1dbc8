"""Hostile text and hostile files against `hivemesh`, in-process (click's CliRunner, no mesh needed): control
characters from the mesh are written visibly, never raw (`output.clean`, on every table cell, error and message);
repeated YAML keys and over-long integers are refused naming the file and line; files are read bounded; odd
audit heads are refused in words; an agent card's version is printable and short."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import click
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from rich.text import Text

from hivemesh.controlplane.cli import a2a, audit, output
from hivemesh.controlplane.policies import parse_documents
from hivemesh.controlplane.yaml_text import load
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.registry import instance_violations
from hivemesh.v1 import agent_pb2, mesh_pb2
from tests.support.cli_offline import hivemesh

HOSTILE = "ok\x1b[2K\x1b[1A\x1b]0;pwned\x07\x9b31m\x7f\u202eevil\u2066\x85\ud800end"
"""Erase the line and the row above, set the window title, a C1 CSI, DEL, a right-to-left override, an isolate,
NEL and a lone surrogate (an undecodable byte)."""
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
"""What must never be written raw (newline and tab are the CLI's own layout)."""

DUPLICATE_ACTION = """\
kind: authz
name: lockdown
spec:
  rules:
    - name: intern-denied
      action: DENY
      from:
        callers: ["spiffe://hivemesh.local/client/intern"]
      action: ALLOW
"""


def assert_nothing_raw(written: str) -> None:
    raw = written.encode("utf-8", "surrogatepass")
    assert b"\x1b" not in raw and not UNSAFE.search(written), f"control characters written raw: {written!r}"


# --- output.clean: every table cell, message and error ------------------------------------------------------
def test_clean_writes_controls_bidi_and_surrogates_as_their_escapes() -> None:
    assert output.clean(HOSTILE) == ("ok\\x1b[2K\\x1b[1A\\x1b]0;pwned\\x07\\x9b31m\\x7f\\u202eevil\\u2066\\x85"
                                     "\\ud800end")
    assert output.clean("a\nb\tc") == "a\\x0ab\\x09c"  # a value is one line
    assert output.clean("a\nb\tc\x1b", layout=True) == "a\nb\tc\\x1b"  # the CLI's own layout is kept
    assert output.clean("héllo 日本 → [x] 1.0.0+b5") == "héllo 日本 → [x] 1.0.0+b5"  # printable text as it is
    assert output.clean(42) == "42"
    styled = output.clean_text(Text.assemble(("red\x1b", "red"), " plain\u202e"))
    assert styled.plain == "red\\x1b plain\\u202e"
    assert [(s.start, s.end, str(s.style)) for s in styled.spans] == [(0, 7, "red")]  # the style stays on "red"


def test_tables_messages_and_errors_write_no_control_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    """Before, rich passed ESC and the rest through: a record could erase its own row from `audit tail`."""
    hostile = HOSTILE.replace("\ud800", "")  # a lone surrogate: below
    table = output.new_table("cell", "styled")
    table.add_row(hostile, Text(hostile, style="red"))
    output.out.print(table)
    output.out.print(f"a message that forgot clean(): {hostile}", highlight=False)
    output.out.print(Text.assemble("a Text that forgot: ", (hostile, "bold")))
    output.out.print_json(json.dumps({"output": hostile}))
    output.err.print(f"[red]x[/red] {output.escape(hostile)}", markup=True, highlight=False)
    output.emit_error("FAILED_PRECONDITION", f"no such run {hostile}", {"field_violations": {hostile: hostile}},
                      as_json=False, hint=hostile)
    written = capsys.readouterr()
    assert_nothing_raw(written.out)
    assert_nothing_raw(written.err)
    assert "ok\\x1b[2K" in written.out and "ok\\x1b[2K" in written.err  # shown, not dropped
    bare = output.CleanTable("capability", box=None)  # the class `top` and `controlplanes` use
    bare.add_row(Text("  └ " + hostile))
    output.out.print(bare)
    assert_nothing_raw(capsys.readouterr().out)
    # JSON's "\ud800" decodes to a lone surrogate, which no UTF-8 stream can write (UnicodeEncodeError before).
    surrogate = output.new_table("cell")
    surrogate.add_row(json.loads('"a\\ud800b"'))
    output.out.print(surrogate)
    assert "a\\ud800b" in capsys.readouterr().out


def test_a2a_ready_line_shows_the_external_cards_name_cleaned(capsys: pytest.CaptureFixture[str]) -> None:
    a2a._ready(False, "a2a-bridge", {"agent": "text-tools", "a2a": HOSTILE, "capabilities": "sum"})
    line = capsys.readouterr().out
    assert_nothing_raw(line)
    assert line.startswith("a2a-bridge ready agent=text-tools a2a=ok\\x1b[2K")


def test_a_click_error_quoting_a_hostile_name_is_written_cleaned(home: Path) -> None:
    """`refusing <head file>: ...` names a file: its name may hold anything (click wrote it raw)."""
    folder, key = _export_folder(home)
    head = home / f"head{HOSTILE.replace(chr(0xD800), '')}.json"
    head.write_text("{}")
    got = hivemesh(home, "audit", "verify", "--file", str(folder), "--key", str(key), "--head", str(head))
    assert got.exit_code == 1 and "refusing" in got.stderr, got.output
    assert_nothing_raw(got.stderr)


# --- YAML: a key written twice, an integer too long ----------------------------------------------------------
def test_a_key_given_twice_is_refused_naming_the_file_line_and_key(home: Path) -> None:
    """Before, PyYAML kept the last: the DENY rule was stored as ALLOW."""
    with pytest.raises(InvalidInputError) as caught:
        parse_documents(DUPLICATE_ACTION, source="lockdown.yaml")
    assert caught.value.message == ("lockdown.yaml: not valid YAML/JSON at line 9, column 7: key 'action' is given "
                                    "twice in one mapping (first at line 6): which one was meant?")
    second_spec = "kind: authz\nname: x\nspec: {rules: []}\nspec:\n  rules: []\n"
    with pytest.raises(InvalidInputError, match=r"x.yaml: .* line 4, column 1: key 'spec' is given twice"):
        parse_documents(second_spec, source="x.yaml")
    with pytest.raises(InvalidInputError, match=r"line 1, column 10: key 'a' is given twice"):
        load('{"a": 1, "a": 2}', "a.json")  # JSON is YAML: the same
    path = home / "lockdown.yaml"
    path.write_text(DUPLICATE_ACTION)
    got = hivemesh(home, "policy", "apply", "-f", str(path))
    assert got.exit_code == 1 and f"{path}: not valid YAML/JSON at line 9, column 7: key 'action'" in got.stderr


def test_merges_may_still_override_the_keys_they_bring() -> None:
    assert load("base: &b {x: 1, y: 2}\nmine:\n  <<: *b\n  x: 3\n", "m.yaml") == {
        "base": {"x": 1, "y": 2}, "mine": {"x": 3, "y": 2}}
    nested = "base: &b {x: 1, y: 2}\nmid: &m\n  <<: *b\n  x: 2\nlast:\n  <<: [*m, *b]\n  y: 3\n<<: *m\nx: 0\n"
    assert load(nested, "m.yaml") == yaml.safe_load(nested)  # merges read as PyYAML always read them


def test_an_integer_too_long_is_refused_naming_the_file_and_line() -> None:
    """Before: a ValueError naming no file (900k digits); a base-60 integer of 1 MiB took tens of seconds."""
    with pytest.raises(InvalidInputError, match=r"^big.yaml: not valid YAML/JSON at line 4, column 13: an integer "
                                                r"of 900,000 characters"):
        parse_documents("kind: retries\nname: x\nspec:\n  attempts: " + "9" * 900_000, source="big.yaml")
    started = time.monotonic()
    with pytest.raises(InvalidInputError, match=r"^sexa.yaml: .* an integer of 600,001 characters"):
        load("a: 1" + ":1" * 300_000, "sexa.yaml")
    assert time.monotonic() - started < 5
    with pytest.raises(InvalidInputError, match=r"^d.yaml: not valid YAML/JSON at line 2, column 7: month must be"):
        load("a: 1\nwhen: 2024-13-45\n", "d.yaml")


# --- files read bounded --------------------------------------------------------------------------------------
def test_policy_text_past_the_limit_is_refused_before_reading_it_all(home: Path) -> None:
    """Before, all of it was read (`-f /dev/zero`: until a MemoryError), and only then refused, with exit 1."""
    got = hivemesh(home, "policy", "apply", "-f", "-", stdin=b"#" * (1 << 20) + b"\n" + b"x" * (1 << 20))
    assert got.exit_code == 2, got.output
    assert "<stdin> is larger than 1,048,576 bytes: refusing to read it" in got.stderr
    bad = home / "latin1.yaml"
    bad.write_bytes(b"kind: retries\nname: caf\xe9\n")
    got = hivemesh(home, "policy", "apply", "-f", str(bad))
    assert got.exit_code == 2 and f"{bad} is not UTF-8 text (byte 0xe9 at offset 23)" in got.stderr, got.output
    got = hivemesh(home, "policy", "apply", "-f", str(bad), "--json")
    assert got.exit_code == 2 and json.loads(got.stderr)["error"]["code"] == "INVALID_ARGUMENT"


def test_call_data_from_a_file_is_read_bounded_and_named(home: Path) -> None:
    big = home / "big.json"
    with open(big, "wb") as f:
        f.truncate((8 << 20) + 1)  # sparse: no disk for it
    got = hivemesh(home, "call", "echo", "-d", f"@{big}")
    assert got.exit_code == 2 and f"{big} is larger than 8,388,608 bytes" in got.stderr, got.output
    huge = home / "huge.json"
    huge.write_text('{"n": ' + "9" * 5000 + "}")
    got = hivemesh(home, "call", "echo", "-d", f"@{huge}")
    assert got.exit_code == 2 and f"{huge} is not JSON this can read" in got.stderr, got.output


# --- audit heads ---------------------------------------------------------------------------------------------
def _export_folder(home: Path) -> tuple[Path, Path]:
    """An (empty) export folder and a pinned key: `verify --file --key --head` needs no control plane."""
    folder = home / "export"
    folder.mkdir(exist_ok=True)
    (folder / "log.jsonl").write_bytes(b"")
    key = home / "key.pem"
    key.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return folder, key


def test_a_deeply_nested_head_file_is_refused_in_words(home: Path) -> None:
    """Before: "error: maximum recursion depth exceeded ..." as UNAVAILABLE."""
    folder, key = _export_folder(home)
    head = home / "deep.json"
    head.write_text("[" * 100_000 + "]" * 100_000)
    args = ["audit", "verify", "--file", str(folder), "--key", str(key), "--head", str(head)]
    got = hivemesh(home, *args)
    assert got.exit_code == 1, got.output
    assert f"refusing {head}: the head is not a signed audit head (JSON nested too deeply)" in got.stderr
    got = hivemesh(home, *args, "--json")
    assert got.exit_code == 1 and json.loads(got.stderr)["error"]["code"] == "FAILED_PRECONDITION", got.output


def test_an_export_head_that_is_not_an_object_is_refused_before_writing() -> None:
    """Before: AttributeError ('list' object has no attribute 'get') after every file was written."""
    assert audit._export_head(b"") == {}
    head = {"type": "x", "sig": base64.b64encode(b"s").decode(), "head_no": 3}
    assert audit._export_head(json.dumps(head).encode()) == head
    for raw in (b"[1, 2]", b"not json", b"[" * 100_000, b'"text"'):
        with pytest.raises(click.ClickException, match=r"export head is not a signed audit head .* nothing was"):
            audit._export_head(raw)


# --- registry: an agent card's version ------------------------------------------------------------------------
def _instance(version: str) -> mesh_pb2.AgentInstance:
    card = agent_pb2.AgentCard(name="shady", version=version, capabilities=[agent_pb2.Capability(name="echo")])
    return mesh_pb2.AgentInstance(card=card, instance_id="i-1", endpoint="127.0.0.1:9")


@pytest.mark.parametrize("version", ["", "0.1.0", "1.0", "1", "2.0.0-rc.1+build.5", "1.0.0.0", "2024-02-15-preview",
                                    "v3_beta", "9" * 64])
def test_card_versions_agents_use_are_accepted(version: str) -> None:
    assert instance_violations(_instance(version)) == {}


@pytest.mark.parametrize("version", ["1.0.0\x1b[2J", "1.0\u202e", "1.0 beta", "1.0\n", "9" * 65, "1.0/2", "ü"])
def test_a_card_version_that_is_not_printable_and_short_is_refused(version: str) -> None:
    """Before, any text was registered, and `hivemesh agents` printed it raw."""
    bad = instance_violations(_instance(version))
    assert list(bad) == ["card.version"] and "must match [0-9A-Za-z.+_-]{0,64}" in bad["card.version"]

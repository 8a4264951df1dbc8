"""What `hivemesh` prints when something is wrong, in-process (click's CliRunner, no mesh needed): bracketed
text survives (rich markup is off for messages), every mistake of every policy document is reported, `--json`
errors are one JSON object with the same exit code, YAML errors name the file, line and column, `policy delete`
says why it will not run without a terminal, and tables never cut an id short."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from hivemesh.controlplane.cli import output
from hivemesh.controlplane.grants import parse_grants_text
from hivemesh.mesh.errors import InvalidInputError
from tests.support.cli_offline import hivemesh

NAME_RULE = "must be a string matching [a-z0-9][a-z0-9._-]{0,62}"
MISTAKES = """\
kind: retries
name: Bad Name
colour: red
spec: {attempts: 2}
---
kind: timeouts
name: fine
spec: {default_ms: 100}
---
kind: retries
name: other
spec: {attempts: 11}
"""


def test_policy_apply_reports_every_mistake_with_brackets_intact_and_as_json(home: Path) -> None:
    path = home / "policies.yaml"
    path.write_text(MISTAKES)
    text = hivemesh(home, "policy", "apply", "-f", str(path))
    assert text.exit_code == 1, text.output
    assert text.stdout == ""
    lines = text.stderr.splitlines()
    assert lines[0] == ("error: documents[0] (retries/Bad Name): colour: unknown field (allowed: apiVersion, kind, "
                        "name, description, version, spec); and 2 more mistakes (INVALID_ARGUMENT, INVALID_INPUT)")
    assert f"  documents[0].name: {NAME_RULE}" in lines  # not "must be a string matching {0,62}"
    assert "  documents[2].spec.attempts: must be <= 10" in lines and len(lines) == 4

    as_json = hivemesh(home, "policy", "apply", "-f", str(path), "--json")
    assert as_json.exit_code == text.exit_code and as_json.stdout == ""
    error = json.loads(as_json.stderr)["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error["message"].endswith("and 2 more mistakes")
    assert error["details"]["reason"] == "INVALID_INPUT"
    assert error["details"]["field_violations"] == {
        "documents[0].colour": "unknown field (allowed: apiVersion, kind, name, description, version, spec)",
        "documents[0].name": NAME_RULE,
        "documents[2].spec.attempts": "must be <= 10",
    }


def test_json_errors_keep_the_exit_code_of_usage_and_local_mistakes(home: Path) -> None:
    for args, code in [
        (["policy", "apply", "-f", str(home / "missing.yaml"), "--json"], 2),  # usage: cannot read the file
        # Mistakes click finds while reading the arguments, before any command runs: its usage text, not JSON.
        (["policy", "apply", "-f", str(home), "--json"], 2),  # a folder, not a file
        (["authz", "check", "--json"], 2),  # a required option missing
        (["policy", "list", "--json"], 1),  # no operator identity in the certs folder
    ]:
        plain = hivemesh(home, *[a for a in args if a != "--json"])
        result = hivemesh(home, *args)
        assert plain.exit_code == result.exit_code == code, (plain.output, result.output)
        error = json.loads(result.stderr)["error"]
        assert error["code"] == ("INVALID_ARGUMENT" if code == 2 else "FAILED_PRECONDITION"), error
        assert error["message"] and error["message"] in " ".join(plain.stderr.split()), (error, plain.stderr)
        assert result.stdout == ""


def test_yaml_errors_name_the_file_line_and_column(home: Path) -> None:
    path = home / "broken.yaml"
    path.write_text("kind: retries\nname: d\nspec: {attempts: [1, 2}\n")
    result = hivemesh(home, "policy", "apply", "-f", str(path))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {path}: not valid YAML/JSON at line 3, column 23: "), result.stderr
    assert "<unicode string>" not in result.output
    with pytest.raises(InvalidInputError) as info:
        parse_grants_text("grants:\n  - name: a\n    subjects: [x\n", source="grants.yaml")
    assert info.value.message.startswith("grants.yaml: not valid YAML/JSON at line 4, column 1: ")


def test_policy_delete_without_a_terminal_says_why_it_will_not_run(home: Path) -> None:
    result = hivemesh(home, "policy", "delete", "retries", "default", stdin="")
    assert result.exit_code == 2, result.output
    assert ("refusing to delete retries/default without --yes when stdin is not a terminal"
            in " ".join(result.stderr.split())), result.stderr
    declined = hivemesh(home, "policy", "delete", "retries", "default", stdin="n\n")
    assert declined.exit_code == 1 and "not deleted: retries/default was not confirmed" in declined.stderr


def test_tables_never_cut_an_id(monkeypatch: pytest.MonkeyPatch) -> None:
    long_id = "spiffe://hivemesh.local/client/" + "a-rather-long-workload-name-" * 4 + "end"
    monkeypatch.delenv("COLUMNS", raising=False)
    assert output._width(io.StringIO()) == output._PIPE_WIDTH  # a pipe or a file: as wide as the content
    monkeypatch.setenv("COLUMNS", "100")
    assert output._width(io.StringIO()) is None  # COLUMNS says how wide: rich follows it

    def render(width: int) -> str:
        console = Console(file=io.StringIO(), width=width, markup=False)
        table = output.new_table("id", "note")
        table.add_row(long_id, "[x] kept")
        console.print(table)
        return console.file.getvalue()  # type: ignore[attr-defined,no-any-return]

    wide = render(output._PIPE_WIDTH)
    assert long_id in wide and "[x] kept" in wide
    narrow = render(60)  # a narrow terminal folds the id over lines, never drops its end for an ellipsis
    assert "…" not in narrow and "end" in narrow


def test_the_status_table_says_why_an_instance_is_skipped() -> None:
    from hivemesh.controlplane.cli.policy import traffic_table
    from hivemesh.v1 import policy_pb2

    node = policy_pb2.NodeTraffic(identity="spiffe://hivemesh.local/client/tester", instance="i-1")
    cap = node.capabilities.add(capability="work", direction="outbound", breaker="closed", calls=9)
    cap.instances.add(instance="flaky-a", breaker="closed", avoided="unanswering")
    cap.instances.add(instance="flaky-b", breaker="open")
    cap.instances.add(instance="flaky-c")
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(traffic_table([node]))
    rows = {line.split("│")[4].strip(): line.split("│")[5].strip()
            for line in console.export_text().splitlines() if "flaky-" in line}
    assert rows == {"flaky-a": "closed, unanswering", "flaky-b": "open", "flaky-c": "-"}, rows

"""The `hivemesh` command line in-process (click's CliRunner): every group lists its commands, usage mistakes
exit 2 with a message that says what to fix, errors a user causes are one line (exit 1) and never a traceback.

None of these needs a running mesh: commands that would reach one are stopped at the missing operator identity,
which shows their options parsed (exit 1, not 2). The process-level tests (test_policy_cli, test_up,
test_workflows, test_trust) run the same commands against a real mesh.
"""

from __future__ import annotations

import json
import platform
import ssl
from importlib import metadata
from pathlib import Path

import pytest

from hivemesh.controlplane.cli.version import version_text
from tests.support.cli_offline import hivemesh

GROUPS: dict[str, set[str]] = {
    "": {"up", "certs", "controlplane", "sidecar", "agents", "call", "join-token", "policy", "status", "workflows",
         "escalations", "audit", "keys", "tokens", "ca", "authz", "allow", "slo", "top", "a2a", "controlplanes",
         "state"},
    "certs": {"init"},
    "state": {"list", "get"},
    "policy": {"apply", "get", "list", "delete", "kinds"},
    "workflows": {"list", "show", "cancel", "resume"},
    "escalations": {"list", "show", "approve", "reject"},
    "audit": {"tail", "query", "verify", "export"},
    "keys": {"rotate", "list"},
    "tokens": {"revoke", "revocations"},
    "ca": {"rotate", "status"},
    "authz": {"check"},
    "slo": {"rules", "list"},
    "a2a": {"serve", "register"},
}


def _commands_listed(help_text: str) -> set[str]:
    section = help_text.split("Commands:", 1)[1]
    return {line.split()[0] for line in section.splitlines() if line.startswith("  ") and line.split()}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_help_of_every_group_lists_its_commands(home: Path, group: str) -> None:
    result = hivemesh(home, *group.split(), "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: hivemesh {group}".rstrip() + " [OPTIONS] COMMAND")
    assert _commands_listed(result.output) == GROUPS[group]
    assert hivemesh(home, *group.split(), "-h").output == result.output  # -h is --help everywhere


def test_every_command_has_help_that_names_its_json_flag_where_it_reports_data(home: Path) -> None:
    without_json = {"certs init", "controlplane", "sidecar", "policy delete", "audit export"}
    for group, commands in GROUPS.items():
        for command in commands:
            name = f"{group} {command}".strip()
            if name in GROUPS:
                continue
            result = hivemesh(home, *name.split(), "--help")
            assert result.exit_code == 0, (name, result.output)
            assert result.output.startswith(f"Usage: hivemesh {name}")
            assert ("--json" in result.output) == (name not in without_json), name


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["nope"], "No such command 'nope'"),
        (["policy", "get", "retries"], "Missing argument 'NAME'"),
        (["policy", "apply"], "Missing option '-f' / '--file'"),
        (["join-token", "w", "--kind", "robot"], "'robot' is not one of 'agent', 'client'"),
        (["join-token", "w", "--ttl", "soon"], "'soon' is not a valid integer"),
        (["audit", "tail", "-n", "many"], "'many' is not a valid integer"),
        (["audit", "query", "--decision", "maybe"], "'maybe' is not one of"),
        (["audit", "query", "--kind", "weird"], "'weird' is not one of"),
        (["call", "cap", "--timeout", "later"], "'later' is not a valid float"),
        # A deadline that is no positive number of seconds: refused here, not sent to fail as already passed.
        (["call", "cap", "--timeout", "-1"], "'--timeout': '-1' is not a deadline: give a positive number of seconds"),
        (["call", "cap", "--timeout", "0"], "'--timeout': '0' is not a deadline"),
        (["call", "cap", "--timeout", "nan"], "'--timeout': 'nan' is not a deadline"),
        (["call", "cap", "--timeout", "inf"], "'--timeout': 'inf' is not a deadline"),
        (["call", "cap", "--timeout", "1e9", "--stream"], "'--timeout': '1e9' is not a deadline"),
        (["call", "cap", "--data", "{not json"], "not valid JSON"),
        (["call", "cap", "--data", "@/nonexistent/input.json"], "cannot read /nonexistent/input.json"),
        (["sidecar", "--agent", "127.0.0.1:1", "--limit", "echo=0"], "expected CAPABILITY=BYTES"),
        (["sidecar"], "give --agent ADDRESS (front an agent) or --client NAME (caller only), exactly one"),
        (["sidecar", "--agent", "127.0.0.1:1", "--max-call-depth", "0"], "0 is not in the range x>=1"),
        (["sidecar", "--client", "c", "--max-call-depth", "3"], "--max-call-depth: only with --agent"),
        (["sidecar", "--client", "c", "--max-held-calls", "0"], "0 is not in the range x>=1"),
        (["sidecar", "--agent", "127.0.0.1:1", "--output-classifier", "dlp"], "give it as package.module:callable"),
        (["sidecar", "--client", "c", "--output-classifier", "m:f"], "--output-classifier: only with --agent"),
        (["controlplane", "--port", "x"], "'x' is not a valid integer"),
        (["tokens", "revoke"], "give exactly one of --jti or --subject"),
        (["tokens", "revoke", "--jti", "j", "--subject", "spiffe://hivemesh.local/agent/a"],
         "give exactly one of --jti or --subject"),
        (["ca", "rotate", "--step", "sideways"], "'sideways' is not one of"),
        (["policy", "apply", "-f", "/nonexistent/policies.yaml"], "cannot read /nonexistent/policies.yaml"),
    ],
)
def test_usage_mistakes_exit_2_and_say_what_to_fix(home: Path, args: list[str], words: str) -> None:
    result = hivemesh(home, *args)
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()), result.output
    assert "Usage: hivemesh" in result.output and "Traceback" not in result.output


def test_call_help_says_what_it_sends_without_data_or_timeout(home: Path) -> None:
    """Without --timeout the capability's `timeouts` policy decides (then 30 s), as for an SDK call; without
    --data the input is {} (tests/integration/test_cli_call_audit_review.py calls both)."""
    text = " ".join(hivemesh(home, "call", "--help").output.split())
    assert "Default: {} (an empty object)" in text and "--data null" in text, text
    assert "Default: the capability's `timeouts` policy" in text and "[default: 30.0]" not in text, text


def test_audit_identity_filters_say_they_take_kind_slash_name(home: Path) -> None:
    for command in ("tail", "query"):
        text = " ".join(hivemesh(home, "audit", command, "--help").output.split())
        for option in ("--caller", "--principal", "--agent"):
            assert f"{option} TEXT" in text and text.split(f"{option} TEXT", 1)[1].split(" --", 1)[0].count(
                "KIND/NAME") == 1, (command, option, text)


def test_an_unknown_demo_is_refused_before_anything_starts(home: Path) -> None:
    result = hivemesh(home, "up", "--demo", "nope")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "nope" in result.output
    assert not (home / "home").exists()  # nothing was started or written


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--listen", "0.0.0.0"], "advertise address '0.0.0.0' is a wildcard"),
        (["--listen", "0.0.0.0", "--advertise", "::"], "advertise address '::' is a wildcard"),
        (["--advertise", "10.0.0.5:7443"], "advertise must be a host name or an IP address without a port"),
        (["--listen", "127.0.0.1:7443"], "--listen must be a host name or an IP address without a port"),
    ],
)
def test_up_refuses_an_address_no_remote_caller_can_dial(home: Path, args: list[str], words: str) -> None:
    result = hivemesh(home, "up", *args, "--demo", "none")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and words in " ".join(result.output.split()), result.output
    assert not (home / "home").exists()  # nothing was started or written


def test_up_demo_list_prints_the_menu_as_json(home: Path) -> None:
    result = hivemesh(home, "up", "--demo", "list", "--json")
    assert result.exit_code == 0, result.output
    menu = json.loads(result.stdout)
    assert {"demo", "pattern", "what"} == set(menu[0]) and any(d["demo"] == "pipeline" for d in menu)
    table = hivemesh(home, "up", "--demo", "list")
    assert table.exit_code == 0 and "pipeline" in table.output and "default: the pipeline" in table.output


def test_up_help_names_every_demo(home: Path) -> None:
    """The --demo help is the menu a user reads first: a demo it leaves out is one they never learn of."""
    from hivemesh.agents.demos import DEMOS

    text = " ".join(hivemesh(home, "up", "--help").output.split())
    missing = [name for name in DEMOS if f" {name}," not in text and f" {name};" not in text]
    assert not missing, f"`up --help` does not name the demos {missing}: {text}"


@pytest.mark.parametrize(
    "args",
    [
        ["policy", "list", "--json"],
        ["policy", "kinds", "--json"],
        ["policy", "get", "retries", "default", "--json"],
        ["status", "--json"],
        ["keys", "list", "--json"],
        ["tokens", "revocations", "--json"],
        ["ca", "status", "--json"],
        ["audit", "query", "--json", "--decision", "deny", "--since", "-15m", "--limit", "5"],
        ["audit", "export", "--out", "exported"],
        ["escalations", "list", "--json", "--all"],
        ["join-token", "worker", "--kind", "client", "--ttl", "60", "--json"],
        ["call", "echo", "--data", '{"text": "hi"}', "--json"],
    ],
)
def test_json_flags_parse_and_a_missing_identity_is_one_helpful_line(home: Path, args: list[str]) -> None:
    result = hivemesh(home, *args)
    assert result.exit_code == 1, result.output  # parsed (2 would be a usage error), stopped before any network
    assert f"no operator identity in {home / 'certs'}" in " ".join(result.output.split())
    assert "hivemesh certs init" in result.output and "Traceback" not in result.output


def test_one_error_formatter_for_a_users_mistake_in_a_file(home: Path) -> None:
    bad = home / "bad.yaml"
    bad.write_text("kind: [unclosed")
    result = hivemesh(home, "policy", "apply", "-f", str(bad))
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())
    assert line.startswith(f"error: {bad}: not valid YAML/JSON") and "(INVALID_ARGUMENT, INVALID_INPUT)" in line
    stdin = hivemesh(home, "policy", "apply", "-f", "-", stdin="")
    assert stdin.exit_code == 1 and "<stdin>: no policy documents in it" in " ".join(stdin.output.split())


def test_certs_init_makes_a_ca_and_refuses_to_replace_it(home: Path) -> None:
    result = hivemesh(home, "certs", "init", "--trust-domain", "example.test")
    assert result.exit_code == 0, result.output
    assert f"CA for spiffe://example.test in {home / 'certs'}" in " ".join(result.output.split())
    assert {"ca.pem", "operator.pem", "controlplane.pem"} <= {p.name for p in (home / "certs").iterdir()}
    again = hivemesh(home, "certs", "init")
    assert again.exit_code == 1 and again.output.startswith("error: ") and "--force" in again.output
    # With an operator identity, a command gets past the identity check to finding the mesh, and says how.
    nowhere = hivemesh(home, "policy", "kinds")
    assert nowhere.exit_code == 2, nowhere.output
    assert " ".join(nowhere.output.split()).startswith("error: mesh location unknown") and "hivemesh up" in (
        nowhere.output)


def test_version_option(home: Path) -> None:
    result = hivemesh(home, "--version")
    assert result.exit_code == 0 and result.output.startswith("hivemesh, version ")
    first, runtime, tls = result.output.splitlines()
    assert first == f"hivemesh, version {metadata.version('hivemesh')}"
    assert runtime == f"CPython {platform.python_version()}, grpcio {metadata.version('grpcio')}"
    assert tls.startswith(f"TLS of the direct links: {ssl.OPENSSL_VERSION}")


@pytest.mark.parametrize(("info", "noted"), [((3, 0, 0, 19, 0), True), ((3, 1, 0, 0, 0), False),
                                             ((3, 5, 0, 7, 0), False), ((1, 1, 1, 23, 15), True)])
def test_version_notes_an_openssl_without_the_fast_gcm(monkeypatch: pytest.MonkeyPatch,
                                                       info: tuple[int, ...], noted: bool) -> None:
    monkeypatch.setattr(ssl, "OPENSSL_VERSION_INFO", info)
    monkeypatch.setattr(ssl, "OPENSSL_VERSION", "OpenSSL x.y.z")
    tls = version_text().splitlines()[-1]
    assert tls.startswith("TLS of the direct links: OpenSSL x.y.z")
    assert ("no VAES code for AES-GCM" in tls) is noted


@pytest.mark.parametrize(("argv", "owned"), [
    (["sidecar", "--agent", "127.0.0.1:1"], True),
    (["controlplane"], True),
    (["--home", "sidecar", "agents"], False),  # "sidecar" is the --home value here, the command is `agents`
    (["--certs-dir", "x", "-v", "controlplane", "--etcd", "e"], True),
    (["call", "sidecar"], False),
    (["--help"], False),
    ([], False),
])
def test_owned_servers_are_told_apart_before_grpc_loads(argv: list[str], owned: bool) -> None:
    from hivemesh.controlplane.cli import owned_server_command

    assert owned_server_command(argv) is owned

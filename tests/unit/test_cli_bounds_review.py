"""Integer and state options of `hivemesh` refuse what the control plane would not honour as given, as a usage
error (exit 2) naming the option and what it takes, before anything reaches a mesh (click's CliRunner, no mesh).

Before: `audit tail -n 0` read 100 records and `-n -3` one; `audit query --limit 0` 100 and `--limit -5` one;
`join-token --ttl 0` minted a 600 s token; `keys rotate --activate-after 0` made the key wait 5 s; values past
int32 ended as "error: Value out of range: N" (protobuf's ValueError); `workflows list --state bogus` printed
"no workflow runs". The same commands against a real control plane: tests/integration/test_cli_bounds_review.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hivemesh.controlplane.cli.slo import _as_json
from hivemesh.controlplane.slo import Objective
from tests.support.cli_offline import hivemesh

NO_IDENTITY = "no operator identity"
"""What a command whose options all parsed stops at with no mesh here (exit 1)."""


def _words(output: str) -> str:
    return " ".join(output.split())


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["audit", "tail", "-n", "0"], "Invalid value for '-n' / '--lines': 0 is not in the range 1<=x<=10000"),
        (["audit", "tail", "-n", "-3"], "Invalid value for '-n' / '--lines': -3 is not in the range 1<=x<=10000"),
        (["audit", "tail", "--lines", "10001"], "'-n' / '--lines': 10001 is not in the range 1<=x<=10000"),
        (["audit", "query", "--limit", "0"], "Invalid value for '--limit': 0 is not in the range 1<=x<=10000"),
        (["audit", "query", "--limit", "-5"], "Invalid value for '--limit': -5 is not in the range 1<=x<=10000"),
        (["audit", "query", "--limit", "99999999999"], "'--limit': 99999999999 is not in the range 1<=x<=10000"),
        (["join-token", "z", "--ttl", "0", "--json"], "Invalid value for '--ttl': 0 is not in the range 1<=x<=604800"),
        (["join-token", "z", "--ttl", "-1"], "Invalid value for '--ttl': -1 is not in the range 1<=x<=604800"),
        (["join-token", "x", "--ttl", "99999999999"], "'--ttl': 99999999999 is not in the range 1<=x<=604800"),
        (["keys", "rotate", "--activate-after", "0", "--json"],
         "Invalid value for '--activate-after': 0 is not in the range 1<=x<=3600: the control plane reads 0 as its "
         "default (5 s), not as now; the shortest delay is 1"),
        (["keys", "rotate", "--activate-after", "-1"], "'--activate-after': -1 is not in the range 1<=x<=3600"),
        (["keys", "rotate", "--activate-after", "999999999999"],
         "Invalid value for '--activate-after': 999999999999 is not in the range 1<=x<=3600"),
        (["keys", "rotate", "--activate-after", "soon"], "'--activate-after': 'soon' is not a valid integer"),
        (["workflows", "list", "--state", "bogus"],
         "Invalid value for '--state': 'bogus' is not one of 'SUBMITTED', 'WORKING', 'INPUT_REQUIRED', 'CANCELED', "
         "'COMPLETED', 'FAILED', 'REJECTED'"),
    ],
)
def test_out_of_range_values_are_usage_errors_naming_the_option_and_range(
    home: Path, args: list[str], words: str
) -> None:
    result = hivemesh(home, *args)
    assert result.exit_code == 2, result.output
    assert "Value out of range" not in result.output
    if "--json" in args:  # one JSON error object, as every --json failure
        error = json.loads(result.output)["error"]
        assert error["code"] == "INVALID_ARGUMENT" and words in error["message"], result.output
    else:
        assert words in _words(result.output) and "Usage: hivemesh" in result.output, result.output


@pytest.mark.parametrize(
    "args",
    [
        ["audit", "tail", "-n", "1"],
        ["audit", "tail", "-n", "10000"],
        ["audit", "query", "--limit", "10000"],
        ["join-token", "z", "--ttl", "1"],
        ["join-token", "z", "--ttl", "604800"],
        ["keys", "rotate", "--activate-after", "1"],
        ["keys", "rotate", "--activate-after", "3600"],
        ["workflows", "list", "--state", "input_required"],
        ["workflows", "list", "--state", "Working"],
    ],
)
def test_values_in_range_parse(home: Path, args: list[str]) -> None:
    """Each bound itself is taken, and a state in any case: the command goes on to look for the mesh."""
    result = hivemesh(home, *args)
    assert result.exit_code == 1 and NO_IDENTITY in result.output, result.output


def test_help_names_each_range_and_the_states(home: Path) -> None:
    for args, words in [
        (["audit", "tail"], "[default: 20; 1<=x<=10000]"),
        (["audit", "query"], "[default: 100; 1<=x<=10000]"),
        (["join-token"], "[default: 600; 1<=x<=604800]"),
        (["keys", "rotate"], "[default: 5; 1<=x<=3600]"),
        (["workflows", "list"], "[SUBMITTED|WORKING|INPUT_REQUIRED|CANCELED|COMPLETED|FAILED|REJECTED]"),
    ]:
        result = hivemesh(home, *args, "--help")
        assert result.exit_code == 0 and words in _words(result.output), (args, result.output)


def test_slo_json_carries_the_availability_budget_in_minutes() -> None:
    """`slo list --json` gives the budget the table shows (43.2 min for 99.9 % over 30 days), or None without an
    availability objective."""
    both = Objective("extract", availability=0.999, latency_threshold_s=0.5, latency_target=0.99, window_days=30)
    latency_only = Objective("summarize", availability=None, latency_threshold_s=10.0, latency_target=0.95,
                             window_days=7)
    assert _as_json(both, "documents")["availability_budget_min"] == 43.2
    ocr = Objective("ocr", availability=0.99, latency_threshold_s=None, latency_target=None, window_days=28)
    assert _as_json(ocr, "documents")["availability_budget_min"] == 403.2
    assert _as_json(latency_only, "llm")["availability_budget_min"] is None

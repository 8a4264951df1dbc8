"""Which engine the content screen's single pass should use: Hyperscan vs RE2 vs the literal prefilters, same run.

The work measured is the input guard's screen per call: `PatternScreen.screen` over an already-decoded JSON
value (one text field), with the default rules, every engine deciding the same (tests/integration/
test_screen_properties.py checks that). Texts: a short field of business prose; 64 KiB of one letter repeated
(the payload of bench/peers.py and bench/mesh_cost.py); 64 KiB of business prose; 64 KiB dense with the rules'
own words (system, prompt, instructions, previous...) but no attack, the worst case for engines that look
for literals first; and text beyond ASCII (64 Ki characters of German prose, of prose with emoji, of ASCII and
emoji alternating (the stand-ins' worst case), and 64 KiB of Chinese in UTF-8), which each engine screens through
the text's ASCII stand-ins (mesh/layers/stand_ins.py) and "literals" screens as the mesh did before the stand-ins:
normalized, then every rule in Python's `re`. Rounds alternate between the engines so drift hits all of them;
the median per call is reported with its ratio to RE2 (the engine before Hyperscan). Compile time is reported
once each.

    .venv/bin/python bench/screen_engines.py              # ~30 s on 2 cores
    .venv/bin/python bench/screen_engines.py --rounds 9
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from hivemesh.mesh.layers.screen import PatternScreen

ENGINES = ("hyperscan", "re2", "literals")


def _words(text: str) -> list[str]:
    return text.split()


_BUSINESS = _words("invoice total customer order shipped quarter revenue margin contract supplier delivery payment "
             "account balance due date region forecast budget review approved pending the a of to and in for "
             "with on by from at this that we our their team report")
_RULE_WORDS = _words("system prompt message instructions rules previous above original hidden secret developer "
               "guidelines prior initial earlier directions")
"""Words of the rules' later parts, without the verbs that open them: every literal engine has to look closer."""
_GERMAN = _words("Rechnung Gesamtbetrag Kunde Bestellung geliefert Quartal Umsatz Marge Vertrag Lieferant Zahlung "
           "Konto fällig Übersicht Prüfung genehmigt ausstehend größer über für mit auf von")


def prose(words: list[str], size: int, seed: int) -> str:
    """Deterministic text of about size characters: sentences of the words, seeded."""
    rnd = random.Random(seed)
    out: list[str] = []
    n = 0
    while n < size:
        sentence = " ".join(rnd.choice(words) for _ in range(rnd.randint(6, 16))).capitalize() + ". "
        out.append(sentence)
        n += len(sentence)
    return "".join(out)[:size]


def texts() -> dict[str, str]:
    k64 = 64 * 1024
    return {
        "200 B business prose": prose(_BUSINESS, 200, 1),
        "64 KiB one letter repeated": "x" * k64,
        "64 KiB business prose": prose(_BUSINESS, k64, 2),
        "64 KiB the rules' own words, no attack": prose(_BUSINESS + _RULE_WORDS, k64, 3),
        "200 B German prose": prose(_GERMAN, 200, 5),
        "64 KiB German prose": prose(_GERMAN, k64, 4),
        "64 KiB business prose with emoji": prose(_BUSINESS, k64, 2).replace(". ", ". \U0001f600 "),
        "64 Ki characters alternating ASCII and emoji": "a\U0001f600" * (k64 // 2),
        "64 KiB Chinese": ("\u6211\u4eec\u7684\u53d1\u7968\u603b\u989d\u5df2\u7ecf\u652f\u4ed8\uff0c"
                           "\u5ba2\u6237\u8ba2\u5355\u5df2\u53d1\u8d27\u3002" * 2000)[:k64 // 3],
    }


def per_call_us(fn: Callable[[], Any], *, min_s: float) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s or n >= 100_000:
            return elapsed / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-s", type=float, default=0.2, help="seconds per sample at least")
    o = ap.parse_args()
    compile_ms: dict[str, float] = {}
    screens: dict[str, PatternScreen] = {}
    for engine in ENGINES:
        start = time.perf_counter()
        screens[engine] = PatternScreen(engine=engine)
        got = screens[engine].prepare()
        compile_ms[engine] = (time.perf_counter() - start) * 1e3
        if got != engine:
            raise SystemExit(f"engine {engine} is not available here (got {got})")
    cases = texts()
    samples: dict[tuple[str, str], list[float]] = {(e, c): [] for e in ENGINES for c in cases}
    for rnd in range(o.rounds):
        for case, text in cases.items():
            value = {"text": text}
            order = ENGINES if rnd % 2 == 0 else tuple(reversed(ENGINES))
            decisions = {screens[e].screen("cap", value) for e in order}
            if decisions != {None}:
                raise SystemExit(f"{case}: an engine refused text with no attack: {decisions}")
            for engine in order:
                screen = screens[engine]
                samples[(engine, case)].append(per_call_us(lambda: screen.screen("cap", value), min_s=o.min_s))  # noqa: B023
    out = sys.stdout.write
    out(f"rounds {o.rounds}; µs per call, median (ratio to re2)\n\n")
    out("| text | " + " | ".join(ENGINES) + " |\n")
    out("|---|" + "---|" * len(ENGINES) + "\n")
    for case in cases:
        med = {e: statistics.median(samples[(e, case)]) for e in ENGINES}
        cells = [f"{med[e]:,.1f} ({med[e] / med['re2']:.2f}×)" for e in ENGINES]
        out(f"| {case} | " + " | ".join(cells) + " |\n")
    out("| compile the default rules (ms, once per process) | "
        + " | ".join(f"{compile_ms[e]:.1f}" for e in ENGINES) + " |\n")


if __name__ == "__main__":
    main()

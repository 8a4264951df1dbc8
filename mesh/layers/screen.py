"""Content screening of inbound payloads: prompt-injection patterns in the text fields of a call's input.

Agents hand text to language models; a payload that says "ignore your previous instructions" is an attack on
the agent behind the mesh, not data. The screen walks every string in the decoded JSON input and refuses the
call (INVALID_ARGUMENT, reason CONTENT_REFUSED, with the field path) before the agent sees it.

Pluggable: `ContentScreen` is one method; `PatternScreen` is the default rule set (conservative, so ordinary
business text passes), `ClassifierScreen` wraps any scoring function (a local model), `Screens` chains them.
Text is NFKC-normalized and stripped of zero-width characters before matching, so `i\u200bgnore` or
full-width letters do not slip past; invisible "tag" characters and bidi overrides are refused outright.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from hivemesh.mesh import simd_scan
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.layers import stand_ins
from hivemesh.mesh.simd_scan import Scanner

try:  # google-re2: every rule in one linear-time pass, where Hyperscan is missing
    import re2
except ImportError:  # pragma: no cover - a platform without its wheel keeps the literal prefilters
    re2 = None

Engine = Literal["auto", "hyperscan", "re2", "literals"]
"""How `PatternScreen` finds which rules can match an ASCII field: one Hyperscan pass, one RE2 pass, or each
rule's literal prefilter; "auto" takes the first that loads. The decisions are the same with each."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    """Why a field was refused."""

    path: str
    """The field's path in the input, e.g. `input.messages[2].text`."""
    rule: str
    detail: str = ""


class ContentScreen(Protocol):
    """Looks at a call's decoded input; returns a Finding to refuse it, None to let it pass."""

    def screen(self, capability: str, value: Any) -> Finding | None: ...


@dataclass(frozen=True)
class ScreenRule:
    name: str
    pattern: re.Pattern[str]
    raw: bool = False
    """Match the text as sent (for invisible characters), not the normalized form."""
    requires: tuple[tuple[str, ...], ...] | None = None
    """A prefilter for ASCII text: lower-case literals, one of each group present in every possible match.
    When a group has none in the text, the rule cannot match and its (costly) regex is skipped. None: always run.
    Only sound for ASCII text, where IGNORECASE matching is exactly lower-case comparison."""
    non_ascii_only: bool = False
    """The pattern matches only non-ASCII characters, so ASCII text skips it."""


_I = re.IGNORECASE | re.MULTILINE
DEFAULT_RULES: Final[tuple[ScreenRule, ...]] = (
    ScreenRule("ignore-instructions", re.compile(
        r"\b(ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}?\b(all\s+|any\s+|the\s+)?(previous|prior|above|"
        r"earlier|preceding|system|original)\b[^.\n]{0,20}?\b(instructions?|prompts?|rules|directions|guidelines)\b",
        _I), requires=(("ignore", "disregard", "forget", "override", "bypass"),
                        ("previous", "prior", "above", "earlier", "preceding", "system", "original"),
                        ("instruction", "prompt", "rules", "direction", "guideline"))),
    ScreenRule("reveal-system-prompt", re.compile(
        r"\b(reveal|print|show|repeat|output|leak|disclose)\b[^.\n]{0,30}?\b(system|hidden|initial|secret)\s+"
        r"(prompt|instructions|message)\b", _I),
        requires=(("reveal", "print", "show", "repeat", "output", "leak", "disclose"),
                  ("system", "hidden", "initial", "secret"), ("prompt", "instructions", "message"))),
    ScreenRule("role-override", re.compile(
        r"\byou\s+are\s+now\s+(in\s+)?(developer|god|dan|jailbreak|unrestricted)\b|\bdeveloper\s+mode\s+"
        r"(enabled|on)\b|\bjailbreak(ed)?\b|\bdo\s+anything\s+now\b", _I),
        requires=(("developer", "god", "dan", "jailbreak", "unrestricted", "anything"),)),
    ScreenRule("chat-template", re.compile(
        r"<\|(im_start|im_end|system|endoftext|assistant|user)\|>|\[/?INST\]|<</?SYS>>|^\s*#{2,}\s*"
        r"(system|new)\s+(prompt|instructions?)\b", _I), requires=(("<|", "inst]", "sys>>", "##"),)),
    ScreenRule("new-instructions", re.compile(r"\b(new|updated|real)\s+instructions?\s*:", _I),
               requires=(("instruction",),)),
    ScreenRule("hidden-characters", re.compile("[\U000e0000-\U000e007f\u202a-\u202e\u2066-\u2069]"), raw=True,
               non_ascii_only=True),
)
_ZERO_WIDTH = re.compile("[\u200b-\u200f\u2060\ufeff\u00ad]")


NFKC_CHUNK: Final = 16_384
"""Characters normalized at a time in a long text, each piece checked for how much it grew (`MAX_GROWTH`)."""
MAX_GROWTH: Final = 4
"""How many times longer NFKC may make a piece of text. Real text barely grows (a ligature "ﬁ" doubles, "½"
triples); one character can become 18 (U+FDFA), so 4 MiB of it grew to 25 million characters and held the
event loop ~3 s in the screen. Text that grows more is refused (`TextExpandsError`)."""


_ASCII_CHAR = re.compile("[\x00-\x7f]")


class TextExpandsError(ValueError):
    """NFKC would make the text more than MAX_GROWTH times longer: screening it would cost far more than its size."""


def normalize(text: str) -> str:
    """What the rules see: NFKC (full-width and look-alike letters folded) without zero-width characters.

    A long text is normalized a piece at a time and refused (TextExpandsError) as soon as a piece grows past
    MAX_GROWTH. A piece ends before an ASCII character where one is near: NFKC never joins an ASCII character
    to what precedes it, so the pieces' forms joined are the whole text's. Where none is near, the joined pieces
    are normalized again, which is exact (NFKC of NFKC-equivalent text is the same). Of the characters dropped,
    only the soft hyphen is in Latin-1, so Latin-1 text (most European text) drops it with one `str.replace`
    instead of a regex pass (64 Ki characters of German prose: ~20 µs against ~220 µs)."""
    if len(text) <= NFKC_CHUNK:
        folded = unicodedata.normalize("NFKC", text)  # grows at most 18-fold: bounded
    else:
        parts, start, exact = [], 0, True
        while start < len(text):
            end = start + NFKC_CHUNK
            if end >= len(text):
                end = len(text)
            else:
                ascii_char = _ASCII_CHAR.search(text, end, end + 1024)
                if ascii_char is not None:
                    end = ascii_char.start()
                else:
                    exact = False
            part = unicodedata.normalize("NFKC", text[start:end])
            if len(part) > MAX_GROWTH * (end - start):
                raise TextExpandsError(f"Unicode normalization makes it over {MAX_GROWTH} times longer")
            parts.append(part)
            start = end
        folded = "".join(parts) if exact else unicodedata.normalize("NFKC", "".join(parts))
    try:
        folded.encode("latin-1")
    except UnicodeEncodeError:
        return _ZERO_WIDTH.sub("", folded)
    return folded.replace("\u00ad", "")


MAX_PATH: Final = 256
"""Characters of a reported path at most (a path past it ends at the step that reached it)."""
MAX_SCREEN_DEPTH: Final = 64
"""How deep the content screen reads a JSON value. Deeper input is refused, not passed unread: a screen that
skipped what lies deeper let an instruction wrapped in 65 arrays reach the agent unscreened."""


def _expands(path: str, exc: TextExpandsError) -> InvalidInputError:
    return InvalidInputError(f"{path}: {exc}, more than the content screen reads", field_violations={path: str(exc)})


def strings(value: Any, path: str = "input", *, max_depth: int = MAX_SCREEN_DEPTH) -> Iterator[tuple[str, str]]:
    """Every string in a JSON value with its path (object keys included, as `path{key}`).

    Raises InvalidInputError at a list or object nested deeper than max_depth: what the screen cannot read,
    it must not let through. A path names each key by its first 64 characters and stops growing past
    `MAX_PATH` characters, and is built only when its node is reached: paths are for reports, and a path per
    pending item (a long key over a long list) once made 115 kB of input cost 343 MB."""
    stack: list[tuple[Any, str, str, int]] = [(value, path, "", 0)]
    while stack:
        node, parent, step, depth = stack.pop()
        where = parent + step if step and len(parent) < MAX_PATH else parent
        if isinstance(node, str):
            yield where, node
        elif depth >= max_depth and isinstance(node, dict | list):
            msg = f"nested deeper than the content screen reads ({max_depth} levels)"
            raise InvalidInputError(f"{path} is {msg}: {where}", field_violations={where: msg})
        elif isinstance(node, dict):
            for k, v in reversed(list(node.items())):
                if isinstance(k, str):
                    yield f"{where}{{{k[:64]}}}", k
                stack.append((v, where, f".{k[:64]}", depth + 1))
        elif isinstance(node, list):
            for i in range(len(node) - 1, -1, -1):
                stack.append((node[i], where, f"[{i}]", depth + 1))


_ASCII_SPACE: Final = "[\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f ]"
"""Python's `\\s` on ASCII text: the information separators \\x1c-\\x1f are whitespace to it (`str.isspace`),
and RE2's own `\\s` leaves them and the vertical tab out (spelled out for Hyperscan too)."""


_INLINE_FLAGS: Final = ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"))


def single_pass_form(compiled: re.Pattern[str]) -> str | None:
    """The pattern for RE2 and Hyperscan, matching on ASCII text exactly what Python's `re` matches; None when
    that cannot be promised (the rule then always runs in Python)."""
    pattern = compiled.pattern
    flags = compiled.flags & ~re.UNICODE
    if flags & ~(re.IGNORECASE | re.MULTILINE | re.DOTALL):
        return None  # VERBOSE, ASCII, LOCALE...: not translated
    if "\\\\" in pattern or re.search(r"\[[^\]]*\\s", pattern) or "(?<" in pattern or "(?=" in pattern \
            or "(?!" in pattern:
        return None  # an escaped backslash, \s inside a class, or look-around: not rewritten safely
    inline = "".join(letter for flag, letter in _INLINE_FLAGS if flags & flag)
    return (f"(?{inline})" if inline else "") + pattern.replace("\\s", _ASCII_SPACE)


class _SinglePass(Protocol):
    """Which rules can match an ASCII text, from one pass for all of them (matches are then confirmed, and their
    text taken, by Python's `re`, so a finding is exactly what the rule alone would give)."""

    unchecked: list[int]
    """Rules the engine cannot stand in for: they always run in Python."""

    def candidates(self, data: bytes) -> list[int]:
        """Positions of the rules that may match data (ASCII text, or a text's ASCII stand-ins), in rule order."""
        ...


def _single_pass_forms(rules: Sequence[ScreenRule]) -> tuple[list[tuple[int, str]], list[int]]:
    """(position, pattern) of each rule an engine may stand in for; the positions of those it cannot."""
    forms: list[tuple[int, str]] = []
    unchecked: list[int] = []
    for i, rule in enumerate(rules):
        if rule.non_ascii_only:
            continue
        form = single_pass_form(rule.pattern)  # on ASCII text a raw rule sees what a normalized one sees
        if form is None:
            unchecked.append(i)
        else:
            forms.append((i, form))
    return forms, unchecked


class _HyperscanPrefilter:
    """One Hyperscan pass: its literal matchers skip text no rule can match at memory speed (64 KiB of prose:
    ~35 µs, against RE2's ~100 µs; the README's "Dependencies" has the figures)."""

    def __init__(self, rules: Sequence[ScreenRule]) -> None:
        forms, self.unchecked = _single_pass_forms(rules)
        self.unchecked += [i for i, form in forms if not form.isascii()]  # its literals cannot be in ASCII text,
        forms = [(i, form) for i, form in forms if form.isascii()]      # but its classes can: let Python decide
        try:
            self._scanner = Scanner(forms) if forms else None
        except simd_scan.CompileError:  # a rule Hyperscan rejects (look-around, empty match...) runs in Python
            kept = [f for f in forms if _compiles(f)]
            self.unchecked += sorted({i for i, _ in forms} - {i for i, _ in kept})
            self._scanner = Scanner(kept) if kept else None
        self.unchecked.sort()

    def candidates(self, data: bytes) -> list[int]:
        if self._scanner is None:
            return list(self.unchecked)
        hits = self._scanner.hits(data)
        if self.unchecked:
            return sorted({*hits, *self.unchecked})
        hits.sort()  # each rule reports once, in the order its first match ends
        return hits


def _compiles(form: tuple[int, str]) -> bool:
    try:
        Scanner([form])
    except simd_scan.CompileError:
        return False
    return True


class _Re2Prefilter:
    """One RE2 set pass (its DFA: ~1.6 ns a byte, on any text)."""

    def __init__(self, rules: Sequence[ScreenRule]) -> None:
        assert re2 is not None
        forms, self.unchecked = _single_pass_forms(rules)
        self._set = re2.Set.SearchSet(re2.Options())
        self.index: list[int] = []  # set index -> rule position
        for i, form in forms:
            try:
                self._set.Add(form)
            except Exception:  # noqa: BLE001 - syntax RE2 lacks: that rule keeps running in Python
                self.unchecked.append(i)
                continue
            self.index.append(i)
        self.unchecked.sort()
        self._set.Compile()

    def candidates(self, data: bytes) -> list[int]:
        hits = self._set.Match(data) or ()
        return sorted({*(self.index[h] for h in hits), *self.unchecked})


def _single_pass(rules: Sequence[ScreenRule], engine: Engine) -> tuple[str, _SinglePass | None]:
    """The first engine asked for that loads and compiles the rules; ("literals", None) when none does."""
    tries = {"auto": ("hyperscan", "re2"), "hyperscan": ("hyperscan",), "re2": ("re2",), "literals": ()}[engine]
    for name in tries:
        if not (simd_scan.AVAILABLE if name == "hyperscan" else re2 is not None):
            continue
        try:
            return name, (_HyperscanPrefilter(rules) if name == "hyperscan" else _Re2Prefilter(rules))
        except Exception:  # never fatal: the next engine, or the literal prefilters, decide the same, slower
            log.warning("%s could not compile the screen's rules", name, exc_info=True)
    if engine not in ("auto", "literals"):
        log.warning("the screen's %s engine is not available here; using the literal prefilters", engine)
    return "literals", None


class PatternScreen:
    """The default screen: regular-expression rules over every string field."""

    def __init__(self, rules: Sequence[ScreenRule] = DEFAULT_RULES, *, engine: Engine = "auto") -> None:
        self.rules = tuple(rules)
        self._want: Engine = engine
        self._engine: str | None = None
        self._single_pass: _SinglePass | None = None
        self._stand_ins_sound: frozenset[int] = frozenset()
        """Rules the single pass also screens text beyond ASCII for, through its stand-ins (layers/stand_ins.py)."""
        self._normalizes = any(not rule.raw for rule in self.rules)
        self._lock = threading.Lock()

    def prepare(self) -> str:
        """Compiles the rules for the single pass, once, and says which engine screens text (ASCII, or the ASCII
        stand-ins of text beyond it): "hyperscan", "re2" or "literals". Hyperscan takes ~0.1 s over the default
        rules, so this waits for a first use rather than for every import; the input guard calls it when it is
        built, so no call waits on it."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    engine, self._single_pass = _single_pass(self.rules, self._want)
                    self._stand_ins_sound = frozenset(
                        i for i, rule in enumerate(self.rules)
                        if not rule.raw and not rule.non_ascii_only and single_pass_form(rule.pattern) is not None
                        and stand_ins.rule_is_sound(rule.pattern))
                    self._engine = engine
        return self._engine

    @property
    def engine(self) -> str:
        return self.prepare()

    def screen(self, capability: str, value: Any) -> Finding | None:
        for path, text in strings(value):
            found = self._screen_ascii(path, text) if text.isascii() else self._screen_unicode(path, text)
            if found is not None:
                return found
        return None

    def _screen_unicode(self, path: str, text: str) -> Finding | None:
        """Text beyond ASCII: the rules see it normalized (raw rules as sent). The single pass over its stand-ins
        rules out the sound rules it finds no candidate for; the others run in Python (64 Ki characters of German
        prose: ~0.9 ms, against ~8 ms for every rule in Python)."""
        if self._engine is None:
            self.prepare()
        try:
            norm = normalize(text) if self._normalizes else text
        except TextExpandsError as exc:
            raise _expands(path, exc) from None
        ruled_out: frozenset[int] = frozenset()
        if self._single_pass is not None and self._stand_ins_sound:
            ruled_out = self._stand_ins_sound.difference(self._single_pass.candidates(stand_ins.ascii_stand_ins(norm)))
        for i, rule in enumerate(self.rules):
            if i in ruled_out:
                continue
            m = rule.pattern.search(text if rule.raw else norm)
            if m:
                return Finding(path, rule.name, m.group(0)[:80])
        return None

    def _screen_ascii(self, path: str, text: str) -> Finding | None:
        """ASCII fast path: normalization is the identity, so one pass says which rules can match (a 64 KiB field
        of prose: ~30 µs with Hyperscan, ~100 µs with RE2, ~0.7 ms for the literal prefilters and ~7 ms for every
        regex in turn)."""
        if self._engine is None:
            self.prepare()
        if self._single_pass is not None:
            for i in self._single_pass.candidates(text.encode("ascii")):
                m = self.rules[i].pattern.search(text)
                if m:
                    return Finding(path, self.rules[i].name, m.group(0)[:80])
            return None
        return self._screen_ascii_literals(path, text)

    def _screen_ascii_literals(self, path: str, text: str) -> Finding | None:
        """Without a single-pass engine: each rule's literal prefilter on the lower-cased text skips regexes that
        cannot match."""
        low: str | None = None
        for rule in self.rules:
            if rule.non_ascii_only:
                continue
            requires = rule.requires
            if requires is not None:
                if low is None:
                    low = text.lower()
                # all(any(word in low for word in group) for group in requires), as plain loops: on a short
                # field the generators cost more than the substring searches they run.
                possible = True
                for group in requires:
                    for word in group:
                        if word in low:
                            break
                    else:
                        possible = False
                        break
                if not possible:
                    continue
            m = rule.pattern.search(text)
            if m:
                return Finding(path, rule.name, m.group(0)[:80])
        return None


class ClassifierScreen:
    """A hook for a model: score(text) in [0, 1]; a field scoring at or above threshold is refused."""

    def __init__(self, score: Callable[[str], float], *, threshold: float = 0.5, min_length: int = 16,
                 name: str = "classifier") -> None:
        if not 0 < threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        self._score = score
        self.threshold = threshold
        self.min_length = min_length
        self.name = name

    def screen(self, capability: str, value: Any) -> Finding | None:
        for path, text in strings(value):
            if len(text) < self.min_length:
                continue
            try:
                s = self._score(normalize(text))
            except TextExpandsError as exc:
                raise _expands(path, exc) from None
            if s >= self.threshold:
                return Finding(path, self.name, f"score {s:.2f} >= {self.threshold:.2f}")
        return None


class Screens:
    """Several screens in order; the first finding refuses."""

    def __init__(self, *screens: ContentScreen) -> None:
        self.screens = screens

    def screen(self, capability: str, value: Any) -> Finding | None:
        for s in self.screens:
            found = s.screen(capability, value)
            if found is not None:
                return found
        return None


DEFAULT_SCREEN: Final = PatternScreen()

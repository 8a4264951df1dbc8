"""Research compilation: parallel searches over three local corpora, aggregated into one cited brief.

Three search agents (`papers`, `news`, `wiki`), each serving `search-<corpus>` over a small JSON-lines
corpus shipped in `agents/corpora/`, and a `research` agent whose `research` capability fans out to all
three (the FanOut pattern, run inside the agent over its Context) and compiles the hits into a brief with
the LLM interface (rule-based by default). A corpus that fails or is late is named in `missing`; the brief
is built from the rest (graceful degradation).

`RESEARCH` is the same fan-out as a module-level pattern, for durable workflows and the demo.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypedDict

from hivemesh.mesh import json_depth
from hivemesh.sdk import Agent, Context, InvalidInputError, capability
from hivemesh.sdk.llm import llm_from_env
from hivemesh.sdk.patterns import FanOut
from hivemesh.sdk.patterns.router import words

CORPORA_DIR = Path(__file__).with_name("corpora")
CORPORA = ("papers", "news", "wiki")
MAX_QUERY = 500


class Query(TypedDict, total=False):
    query: str
    limit: int


class Hit(TypedDict):
    id: str
    title: str
    snippet: str
    score: float
    source: str


class Hits(TypedDict):
    source: str
    hits: list[Hit]


@cache
def load_corpus(name: str) -> tuple[dict[str, str], ...]:
    """The documents of a shipped corpus (id, title, text)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}")
    lines = (CORPORA_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return tuple(json_depth.loads(line) for line in lines if line.strip())


def _check_query(req: Query) -> tuple[str, int]:
    query = str(req.get("query", "")).strip()
    if not query or len(query) > MAX_QUERY:
        raise InvalidInputError(f"query must be 1..{MAX_QUERY} characters",
                                field_violations={"input.query": "empty or too long"})
    limit = int(req.get("limit", 3))
    if not 1 <= limit <= 20:
        raise InvalidInputError("limit must be 1..20", field_violations={"input.limit": "out of range"})
    if not words(query):
        raise InvalidInputError("the query has no searchable words", field_violations={"input.query": "no words"})
    return query, limit


def search(corpus: str, query: str, limit: int = 3) -> list[Hit]:
    """BM25 over one corpus (title words count double). Deterministic: ties break on document id."""
    docs = load_corpus(corpus)
    tokenized = [Counter(words(d["title"]) * 2 + words(d["text"])) for d in docs]
    avg = sum(sum(t.values()) for t in tokenized) / max(len(tokenized), 1)
    q = set(words(query))
    scored = []
    for doc, tf in zip(docs, tokenized, strict=True):
        length = sum(tf.values())
        score = 0.0
        for term in q:
            df = sum(1 for t in tokenized if term in t)
            if not df or term not in tf:
                continue
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
            score += idf * tf[term] * 2.2 / (tf[term] + 1.2 * (0.25 + 0.75 * length / avg))
        if score > 0:
            first = re.split(r"(?<=\.)\s", doc["text"], maxsplit=1)[0]
            scored.append(Hit(id=doc["id"], title=doc["title"], snippet=first, score=round(score, 3), source=corpus))
    scored.sort(key=lambda h: (-h["score"], h["id"]))
    return scored[:limit]


class _SearchAgent(Agent):
    corpus = ""

    def _search(self, req: Query) -> Hits:
        query, limit = _check_query(req)
        return {"source": self.corpus, "hits": search(self.corpus, query, limit)}


class PapersSearchAgent(_SearchAgent):
    """Searches the papers corpus."""

    name = "papers"
    corpus = "papers"

    @capability(name="search-papers", description="Search research papers on distributed systems",
                tags=["research", "search"], idempotent=True)
    async def search_papers(self, req: Query) -> Hits:
        return self._search(req)


class NewsSearchAgent(_SearchAgent):
    """Searches the news corpus."""

    name = "news"
    corpus = "news"

    @capability(name="search-news", description="Search recent technology news", tags=["research", "search"],
                idempotent=True)
    async def search_news(self, req: Query) -> Hits:
        return self._search(req)


class WikiSearchAgent(_SearchAgent):
    """Searches the encyclopedia corpus."""

    name = "wiki"
    corpus = "wiki"

    @capability(name="search-wiki", description="Search encyclopedia articles", tags=["research", "search"],
                idempotent=True)
    async def search_wiki(self, req: Query) -> Hits:
        return self._search(req)


def merge_hits(outputs: Mapping[str, Any]) -> list[Hit]:
    """Fan-in: every branch's hits, best first (score, then source and id for determinism)."""
    hits: list[Hit] = [h for out in outputs.values() for h in (out or {}).get("hits", [])]
    hits.sort(key=lambda h: (-h["score"], h["source"], h["id"]))
    return hits


RESEARCH = FanOut([f"search-{c}" for c in CORPORA], aggregate=merge_hits, branch_timeout=5.0, name="research")
"""The research fan-out as a pattern (a workflow definition: 'hivemesh.agents.research:RESEARCH')."""


def _compile_rule(prompt: str) -> str:
    lines = [ln for ln in prompt.splitlines() if ln.startswith("- ")]
    return " ".join(ln[2:] for ln in lines[:4]) or "No source had anything on this question."


class Report(TypedDict):
    query: str
    brief: str
    sources: list[Hit]
    missing: list[str]
    """Corpora that failed or answered late, by branch name."""


class ResearchAgent(Agent):
    """Compiles a research brief from parallel searches."""

    name = "research"

    def __init__(self) -> None:
        super().__init__()
        self.llm = llm_from_env({"compile": _compile_rule})

    @capability(description="Research a question across every corpus in parallel and compile a cited brief",
                tags=["research"], idempotent=True)
    async def research(self, req: Query, ctx: Context) -> Report:
        query, limit = _check_query(req)
        result = await RESEARCH.run(ctx, {"query": query, "limit": limit})
        hits = result.output[: limit * 2]
        prompt = f"Question: {query}\nFindings:\n" + "\n".join(
            f"- {h['snippet']} [{h['source']}:{h['id']}]" for h in hits)
        brief = await self.llm.complete(prompt, task="compile", system="Write a short cited brief.")
        return {"query": query, "brief": brief.text, "sources": hits, "missing": sorted(result.details["failed"])}

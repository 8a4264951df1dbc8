"""Content creation loop: a writer, an editor and a fact-checker iterate on one draft until all approve.

The writer drafts from its own notes, one of which is out of date (etcd's legacy client port 4001); the
editor trims filler words and revises the draft itself; the fact-checker checks every claim against its
reference facts and names the wrong ones. `CONTENT_LOOP` (PeerReview) runs writer → editor → fact-checker
rounds: round 1 is rejected (filler words, a stale port), round 2 is approved by both. Each round's draft
and verdicts are recorded and visible.
"""

from __future__ import annotations

import re
from typing import Any, TypedDict

from hivemesh.sdk import Agent, InvalidInputError, capability
from hivemesh.sdk.llm import llm_from_env
from hivemesh.sdk.patterns import PeerReview

# topic → claim → (sentence template, the fact-checker's reference value)
FACTS: dict[str, dict[str, tuple[str, str]]] = {
    "etcd": {
        "consensus": ("etcd keeps every member in agreement with the {} consensus algorithm.", "Raft"),
        "port": ("Clients connect on port {} by default.", "2379"),
        "leases": ("A lease expires when its time-to-live, counted in {}, runs out.", "seconds"),
    },
    "raft": {
        "leader": ("Raft elects a {} that orders every write.", "leader"),
        "majority": ("A cluster of five servers keeps working with {} failed servers.", "two"),
    },
    "grpc": {
        "transport": ("gRPC runs over {}.", "HTTP/2"),
        "idl": ("Services are described in {}.", "Protocol Buffers"),
    },
}
# The writer's own notes: mostly right, one stale.
WRITER_NOTES: dict[str, dict[str, str]] = {
    "etcd": {"consensus": "Raft", "port": "4001", "leases": "seconds"},
    "raft": {"leader": "leader", "majority": "two"},
    "grpc": {"transport": "HTTP/2", "idl": "Protocol Buffers"},
}
_FILLER = re.compile(r"\b(very|really|basically|actually)\s+", re.IGNORECASE)
MAX_DRAFT = 20_000


class Brief(TypedDict, total=False):
    topic: str
    audience: str


class WriteRequest(TypedDict, total=False):
    brief: Brief
    draft: str | None
    feedback: list[dict[str, Any]]
    round: int


class ReviewRequest(TypedDict, total=False):
    brief: Brief
    draft: str
    round: int


class Verdict(TypedDict, total=False):
    approved: bool
    feedback: list[str]
    draft: str
    corrections: dict[str, str]


def _topic(brief: Any) -> str:
    topic = str((brief or {}).get("topic", "")).lower() if isinstance(brief, dict) else ""
    if topic not in FACTS:
        raise InvalidInputError(f"unknown topic {topic[:40]!r}; known: {', '.join(sorted(FACTS))}",
                                field_violations={"input.brief.topic": "unknown"})
    return topic


def _draft_text(req: dict[str, Any]) -> str:
    draft = req.get("draft")
    if not isinstance(draft, str) or not draft.strip() or len(draft) > MAX_DRAFT:
        raise InvalidInputError("a review needs a non-empty draft (text)", field_violations={"input.draft": "bad"})
    return draft


class WriterAgent(Agent):
    """Writes and revises drafts."""

    name = "writer"

    def __init__(self) -> None:
        super().__init__()
        self.llm = llm_from_env({"write": lambda p: p.split("\n", 1)[1] if "\n" in p else p})

    @capability(name="write-draft", description="Write or revise a short article from a brief and feedback",
                tags=["content"], idempotent=True)
    async def write_draft(self, req: WriteRequest) -> dict[str, Any]:
        topic = _topic(req.get("brief"))
        notes = dict(WRITER_NOTES[topic])
        for item in req.get("feedback") or []:
            for claim, value in (item.get("corrections") or {}).items():
                if claim in notes:
                    notes[claim] = str(value)
        previous = req.get("draft")
        if isinstance(previous, str) and previous.strip():
            # Revise: keep the editor's wording, fix the claims the fact-checker corrected.
            text = previous
            for claim, (template, _) in FACTS[topic].items():
                before, after = template.split("{}")
                pattern = re.compile(re.escape(before) + r"(.+?)" + re.escape(after))
                text = pattern.sub(template.format(notes[claim]).replace("\\", "\\\\"), text)
        else:
            opening = f"{topic} is really the backbone of many distributed systems."
            text = " ".join([opening, *(t.format(notes[c]) for c, (t, _) in FACTS[topic].items())])
        done = await self.llm.complete(f"Write about {topic}.\n{text}", task="write")
        return {"draft": done.text}


class EditorAgent(Agent):
    """Edits for style: trims filler words and double spaces; approves a draft that needs no edit."""

    name = "editor"

    @capability(name="edit-draft", description="Edit a draft for style", tags=["content"], idempotent=True)
    async def edit_draft(self, req: ReviewRequest) -> Verdict:
        draft = _draft_text(dict(req))
        edited = re.sub(r"\s{2,}", " ", _FILLER.sub("", draft)).strip()
        if edited == draft:
            return {"approved": True, "feedback": []}
        return {"approved": False, "feedback": ["removed filler words"], "draft": edited}


class FactCheckerAgent(Agent):
    """Checks every claim against reference facts."""

    name = "fact-checker"

    @capability(name="fact-check", description="Check a draft's factual claims", tags=["content"], idempotent=True)
    async def fact_check(self, req: ReviewRequest) -> Verdict:
        topic = _topic(req.get("brief"))
        draft = _draft_text(dict(req))
        wrong: dict[str, str] = {}
        notes: list[str] = []
        for claim, (template, truth) in FACTS[topic].items():
            before, after = template.split("{}")
            m = re.search(re.escape(before) + r"(.+?)" + re.escape(after), draft)
            if m is None:
                notes.append(f"missing claim: {claim}")
            elif m.group(1) != truth:
                wrong[claim] = truth
                notes.append(f"{claim}: '{m.group(1)}' should be '{truth}'")
        return {"approved": not notes, "feedback": notes, "corrections": wrong}


CONTENT_LOOP = PeerReview(writer="write-draft", reviewers=["edit-draft", "fact-check"], max_rounds=3,
                          name="content-loop")
"""Workflow definition 'hivemesh.agents.content:CONTENT_LOOP'; input {"brief": {"topic": "etcd"}}."""

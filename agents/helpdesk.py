"""IT helpdesk: a router sends each request to the network, security or application specialist.

The specialists only describe themselves (capability descriptions and tags in their agent cards); the
`HELPDESK` Router picks one per request from the registry (rules first, then keywords over those
descriptions and tags), and unknown requests go to a person. A specialist that finds the problem belongs to
another team hands the conversation over (`handoff`): the application specialist sends a "strange login
page" to security, with what it learned. `HELPDESK_CHAT` is that conversation as a Handoff pattern.

Each specialist accepts `{"text": ...}` (routed requests) or a handoff turn `{"message", "conversation"}`.
"""

from __future__ import annotations

import hashlib
from typing import Any, TypedDict

from hivemesh.sdk import Agent, InvalidInputError, capability
from hivemesh.sdk.llm import llm_from_env
from hivemesh.sdk.patterns import Handoff, Router, Rule, handoff
from hivemesh.sdk.patterns.router import words

MAX_TEXT = 4000


class Ticket(TypedDict, total=False):
    text: str
    message: str
    conversation: dict[str, Any]
    user: str


class Resolution(TypedDict, total=False):
    team: str
    ticket: str
    diagnosis: str
    steps: list[str]
    confidence: float
    reply: str
    handoff: dict[str, Any]


# (keywords, diagnosis, steps) per team; first match wins, else the generic entry.
_PLAYBOOK: dict[str, list[tuple[frozenset[str], str, list[str]]]] = {
    "network": [
        (frozenset({"vpn"}), "VPN tunnel drops", ["Switch the VPN client to TCP 443", "Update the VPN client",
                                                  "If it persists, send the client log to network ops"]),
        (frozenset({"wifi", "wireless"}), "Wi-Fi association problem",
         ["Forget and re-join the corporate SSID", "Check the 5 GHz band is enabled"]),
        (frozenset({"dns", "resolve"}), "DNS resolution failure",
         ["Flush the DNS cache", "Use the corporate resolver"]),
        (frozenset(), "General connectivity problem", ["Check the cable or Wi-Fi", "Run the network diagnostic"]),
    ],
    "security": [
        (frozenset({"phish", "phishing", "suspicious", "login", "page"}), "Possible credential phishing",
         ["Do not enter credentials", "Reset your password now", "Security will revoke active sessions"]),
        (frozenset({"password", "mfa", "locked"}), "Account access problem",
         ["Reset the password in the self-service portal", "Re-enroll MFA if the device changed"]),
        (frozenset({"malware", "virus", "ransomware"}), "Possible malware",
         ["Disconnect from the network", "Do not reboot", "Security will image the disk"]),
        (frozenset(), "Security concern", ["Security will review the report within 4 hours"]),
    ],
    "application": [
        (frozenset({"crash", "crashes", "freeze"}), "Application crash",
         ["Update the application", "Clear its cache", "Attach the crash report"]),
        (frozenset({"install", "license"}), "Installation or licence problem",
         ["Install from the software centre", "Request a licence through the portal"]),
        (frozenset({"excel", "outlook", "word"}), "Office application problem",
         ["Run the Office repair tool", "Start in safe mode to rule out add-ins"]),
        (frozenset(), "Application problem", ["Reproduce the problem and attach a screenshot"]),
    ],
}
_HANDOFF_TO_SECURITY = frozenset({"login", "phish", "phishing", "suspicious", "password"})


def _text(req: Ticket) -> str:
    text = req.get("text") or req.get("message") or ""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError("a ticket needs a non-empty 'text' (or a handoff 'message')",
                                field_violations={"input.text": "missing or empty"})
    if len(text) > MAX_TEXT:
        raise InvalidInputError(f"the ticket text is longer than {MAX_TEXT} characters",
                                field_violations={"input.text": "too long"})
    return text


class _Specialist(Agent):
    team = ""

    def __init__(self) -> None:
        super().__init__()
        self.llm = llm_from_env({"reply": lambda p: p.split("\n", 1)[0]})

    async def _resolve(self, req: Ticket) -> Resolution:
        text = _text(req)
        found = set(words(text))
        diagnosis, steps, confidence = "", [], 0.0
        for keys, entry_diagnosis, entry_steps in _PLAYBOOK[self.team]:
            if not keys or set(words(" ".join(keys))) & found:
                diagnosis, steps, confidence = entry_diagnosis, entry_steps, (0.9 if keys else 0.5)
                break
        ticket = f"{self.team[:3].upper()}-{int(hashlib.sha256(text.encode()).hexdigest()[:6], 16) % 100000:05d}"
        reply = await self.llm.complete(f"{diagnosis}: {steps[0]}.\n{text}", task="reply")
        return {"team": self.team, "ticket": ticket, "diagnosis": diagnosis, "steps": steps,
                "confidence": confidence, "reply": reply.text}


class NetworkSpecialist(_Specialist):
    """Network support."""

    name = "network-desk"
    team = "network"

    @capability(name="network-support", tags=["helpdesk", "network", "vpn", "wifi", "dns", "connectivity"],
                description="Network problems: VPN, Wi-Fi, DNS, connectivity, slow or dropped connections",
                idempotent=True)
    async def network_support(self, req: Ticket) -> Resolution:
        return await self._resolve(req)


class SecuritySpecialist(_Specialist):
    """Security support."""

    name = "security-desk"
    team = "security"

    @capability(name="security-support", tags=["helpdesk", "security", "phishing", "password", "malware"],
                description="Security incidents: phishing, suspicious login pages, passwords, MFA, malware",
                idempotent=True)
    async def security_support(self, req: Ticket) -> Resolution:
        return await self._resolve(req)


class ApplicationSpecialist(_Specialist):
    """Application support; hands credential problems over to security."""

    name = "application-desk"
    team = "application"

    @capability(name="application-support", tags=["helpdesk", "application", "software", "crash", "install"],
                description="Application problems: crashes, installs, licences, Office apps, software errors",
                idempotent=True)
    async def application_support(self, req: Ticket) -> Resolution:
        text = _text(req)
        seen = set(words(text)) & set(words(" ".join(_HANDOFF_TO_SECURITY)))
        if seen:
            return handoff("security-support", reason="looks like a credential problem, not an application bug",
                           context={"app_checked": True, "signals": sorted(seen)},
                           reply="This looks like a security matter; passing you to the security team.")  # type: ignore[return-value]
        return await self._resolve(req)


HELPDESK = Router(
    candidates_tag="helpdesk",
    rules=[Rule("security-support", keywords=("ransomware", "phishing"))],
    ask_human=True,
    name="helpdesk",
)
"""Route a ticket {"text": ...} to a specialist; unknown → a person picks the capability."""

HELPDESK_CHAT = Handoff(entry="application-support", max_handoffs=2, name="helpdesk-chat")
"""A conversation that starts at application support and may be handed over."""

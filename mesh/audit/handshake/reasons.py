"""Why a TLS handshake failed, from the TLS library's words: the audit record's reason, decision and message."""

from __future__ import annotations

import re
from typing import Final

_SSL_DETAIL = re.compile(r"OPENSSL_internal:(.*)$", re.S)

# Why a handshake failed, most specific first: reason, audit decision, what it means, and the words in
# gRPC's error that identify it. A client hanging up mid-handshake is an error, not a refusal.
_REASONS: Final = (
    ("TLS_CERT_EXPIRED", "deny", "the client certificate has expired",
     ("certificate has expired", "CERTIFICATE_EXPIRED")),
    ("TLS_CERT_NOT_YET_VALID", "deny", "the client certificate is not valid yet", ("certificate is not yet valid",)),
    ("TLS_CERT_MISSING", "deny", "the client sent no certificate", ("PEER_DID_NOT_RETURN_A_CERTIFICATE",)),
    ("TLS_CERT_UNTRUSTED", "deny", "the client certificate does not chain to the mesh's trust bundle",
     ("CERTIFICATE_VERIFY_FAILED", "UNKNOWN_CA", "BAD_CERTIFICATE")),
    ("TLS_PLAINTEXT", "deny", "the client did not speak TLS (plaintext)",
     ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST")),
    ("TLS_HANDSHAKE_TIMEOUT", "deny", "the TLS handshake did not finish in time",
     ("Handshake timed out", "Deadline Exceeded", "DEADLINE_EXCEEDED")),
    ("TLS_HANDSHAKES_FULL", "deny", "the port had as many handshakes in progress as it takes: the connection was "
     "closed at once", ("too many handshakes in progress",)),
    ("TLS_CONNECTION_CLOSED", "error", "the client hung up during the TLS handshake",
     ("Socket closed", "Connection reset", "Broken pipe", "End of TCP stream", "UNEXPECTED_EOF", "EOF occurred")),
)
DEFAULT_REASON: Final = "TLS_HANDSHAKE_FAILED"
_NOISE: Final = (": Invalid certificate verification context", ": OK")


def classify(error: str) -> tuple[str, str]:
    """(reason, audit decision) for gRPC's error text."""
    for reason, decision, _, needles in _REASONS:
        if any(n in error for n in needles):
            return reason, decision
    return DEFAULT_REASON, "deny"


def detail(error: str) -> str:
    """The TLS library's own words in gRPC's error text (or the text itself), without gRPC's filler."""
    text = error.strip()
    for _ in range(2):
        for noise in _NOISE:
            text = text.removesuffix(noise)
    m = _SSL_DETAIL.search(text)
    return (m.group(1) if m else text).strip()[:240]


def describe(error: str) -> str:
    """One sentence for an operator: what the refusal means, then the TLS library's words."""
    reason, _ = classify(error)
    meaning = next((m for r, _, m, _ in _REASONS if r == reason), "the TLS handshake failed")
    return f"{meaning} ({detail(error)})"

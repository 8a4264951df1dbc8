"""The shipped sample documents: their names, how each is rendered, and access to their files.

Samples are looked up by name in this table, never by joining a caller's string onto a path, so a
`{"sample": "../../etc/passwd"}` input can only ever be refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class SampleSpec:
    """One sample document: `samples/<name>.txt` is its source text, `samples/<name>.pgm` its scan."""

    name: str
    seed: int
    """Seed of the scan noise, so regenerating gives the same bytes."""
    scale: int
    """Pixels per font pixel (the OCR agent infers it back from the image)."""
    valid: bool
    """Whether the validation agent should accept the document."""
    description: str

    def __post_init__(self) -> None:
        if not 2 <= self.scale <= 4:
            raise ValueError(f"sample {self.name}: scale must be 2..4, got {self.scale}")


SAMPLES: tuple[SampleSpec, ...] = (
    SampleSpec("invoice-001", 1001, 2, True, "Tool supplier invoice in USD, ISO date, three line items"),
    SampleSpec("receipt-002", 2002, 2, True, "Cafe receipt, US date, '2 x item @ price' lines, cash and change"),
    SampleSpec("invoice-003", 3003, 2, True, "Design studio invoice in EUR, day-first dotted date, 1,234.56 amounts"),
    SampleSpec("invoice-004", 4004, 2, False, "Office supply invoice whose subtotal does not match its line items"),
    SampleSpec("receipt-005", 5005, 3, False, "Corner shop receipt with no date, scanned at a larger scale"),
)

_BY_NAME = {s.name: s for s in SAMPLES}


def list_samples() -> list[str]:
    """Names of the shipped samples, in a stable order."""
    return [s.name for s in SAMPLES]


def sample_spec(name: str) -> SampleSpec:
    """The spec of sample name; KeyError when there is no such sample."""
    return _BY_NAME[name]


def _file(name: str, ext: str) -> bytes:
    spec = sample_spec(name)
    return (resources.files("hivemesh.agents") / "samples" / f"{spec.name}.{ext}").read_bytes()


def sample_text(name: str) -> str:
    """The source text a sample was rendered from (the OCR ground truth)."""
    return _file(name, "txt").decode("utf-8")


def sample_image(name: str) -> bytes:
    """The shipped PGM scan of a sample."""
    return _file(name, "pgm")

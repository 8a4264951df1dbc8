"""Render text into a "scanned" PGM image with the built-in 5×7 font, plus deterministic scan noise.

    python -m hivemesh.agents._render            # (re)write agents/samples/*.pgm from samples/*.txt
    python -m hivemesh.agents._render --check    # exit 1 if a committed .pgm differs from a fresh render

The noise (uneven illumination, gray jitter, salt-and-pepper specks) comes from SHAKE-256 of the sample's
name and seed rather than `random`, so the bytes are identical on every Python version and platform:
a test regenerates every sample and compares bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hivemesh.agents._font import CHARSET, HEIGHT, WIDTH, ink
from hivemesh.agents._samples import SAMPLES, SampleSpec

log = logging.getLogger(__name__)

_SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
_CHAR_PITCH = WIDTH + 1  # font pixels from one character cell to the next
_LINE_PITCH = HEIGHT + 3  # font pixels from one text line to the next
_MARGIN = 8  # font pixels of paper around the text
_INK = 45
_SPECK_PER_256 = 3  # ~1.2% of pixels flip (salt on paper, pepper in ink)


def _ink_mask(lines: Sequence[str], scale: int, width: int, height: int) -> bytearray:
    mask = bytearray(width * height)
    margin = _MARGIN * scale
    block = b"\x01" * scale
    for li, line in enumerate(lines):
        top = margin + li * _LINE_PITCH * scale
        for ci, ch in enumerate(line):
            left = margin + ci * _CHAR_PITCH * scale
            for r in range(HEIGHT):
                for c in range(WIDTH):
                    if not ink(ch, r, c):
                        continue
                    x = left + c * scale
                    for y in range(top + r * scale, top + (r + 1) * scale):
                        mask[y * width + x : y * width + x + scale] = block
    return mask


def render_text(text: str, *, scale: int, seed: int, label: str = "") -> bytes:
    """A binary PGM (P5, 8-bit) of text: one line per line of text, fixed-pitch 5×7 glyphs.

    Args:
        text: characters from the font's CHARSET only (so every rendered glyph can be read back).
        scale: pixels per font pixel, 2..4 (the OCR needs at least 2 to tell ink from specks).
        seed: noise seed; the same (text, scale, seed, label) always gives the same bytes.
        label: written as a PGM comment and mixed into the noise.
    Raises:
        ValueError: on characters outside the font, a bad scale, or empty text.
    """
    if not 2 <= scale <= 4:
        raise ValueError(f"scale must be 2..4, got {scale}")
    lines = [line.rstrip() for line in text.rstrip("\n").split("\n")]
    if not any(lines):
        raise ValueError("nothing to render")
    bad = sorted({ch for line in lines for ch in line} - CHARSET)
    if bad:
        raise ValueError(f"characters not in the font: {''.join(bad)!r}")
    columns = max(len(line) for line in lines)
    width = 2 * _MARGIN * scale + columns * _CHAR_PITCH * scale - scale
    height = 2 * _MARGIN * scale + len(lines) * _LINE_PITCH * scale - 3 * scale
    mask = _ink_mask(lines, scale, width, height)
    noise = hashlib.shake_256(f"hivemesh-sample:{label}:{seed}".encode()).digest(2 * width * height)
    pixels = bytearray(width * height)
    i = 0
    for y in range(height):
        shade = 242 - (10 * y) // height
        for x in range(width):
            jitter = noise[2 * i] % 25 - 12
            speck = noise[2 * i + 1] < _SPECK_PER_256
            if mask[i]:
                value = 215 + jitter if speck else _INK + jitter
            else:
                value = 55 + jitter if speck else shade - (18 * x) // width + jitter
            pixels[i] = value
            i += 1
    header = f"P5\n# hivemesh sample {label or '-'} seed {seed} scale {scale}\n{width} {height}\n255\n"
    return header.encode("ascii") + bytes(pixels)


def render_sample(spec: SampleSpec, samples_dir: Path = _SAMPLES_DIR) -> bytes:
    """The PGM bytes of a shipped sample, rendered from its .txt source."""
    text = (samples_dir / f"{spec.name}.txt").read_text(encoding="utf-8")
    return render_text(text, scale=spec.scale, seed=spec.seed, label=spec.name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hivemesh.agents._render", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    parser.add_argument("--dir", type=Path, default=_SAMPLES_DIR, help="samples folder (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stale = 0
    for spec in SAMPLES:
        data = render_sample(spec, args.dir)
        path = args.dir / f"{spec.name}.pgm"
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                log.error("%s is stale: run python -m hivemesh.agents._render", path)
                stale += 1
            continue
        path.write_bytes(data)
        log.info("wrote %s (%d bytes)", path, len(data))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

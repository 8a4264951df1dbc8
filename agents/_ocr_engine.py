"""A small, deterministic OCR engine for fixed-pitch bitmap-font scans: PGM decoding and recognition.

The steps are the classic ones, sized for the built-in 5×7 font:
1. binarize with Otsu's threshold (robust to uneven illumination and gray jitter);
2. erode with a 2×2 element so isolated specks vanish from the projections (glyph strokes are at least
   2 px wide, so they survive, minus one pixel on the right and bottom);
3. find text lines from the row projection and infer the scale (pixels per font pixel) from their height;
4. find the character grid's horizontal phase from the column histogram: the inter-character gap is the
   one place no glyph ever inks;
5. sample each 5×7 cell by majority vote over its scale×scale blocks, on the un-eroded image, and match
   it against the font by Hamming distance.

Rows are held as Python ints with one byte per pixel (0 or 1), so erosion, projections and block sums are
big-integer shifts and adds done in C rather than per-pixel Python loops.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

from hivemesh.agents._font import CELLS, GLYPHS, HEIGHT, WIDTH

MAX_SIDE = 4096
"""Largest accepted width or height, in pixels."""
MAX_PIXELS = 4096 * 1024
"""Largest accepted image area (4 Mpx); a header claiming more is refused before any raster is read."""
MIN_SCALE = 2
"""Fewest pixels per font pixel: erosion must be able to tell a stroke from a speck."""
MAX_SCALE = 12
"""Most pixels per font pixel: block sums (scale² ink pixels) must fit in one byte."""
_UNKNOWN = "\ufffd"
_MAX_GLYPH_DISTANCE = CELLS // 4  # a cell further than this from every glyph is not a character
_CHAR_PITCH = WIDTH + 1


class PgmError(ValueError):
    """The bytes are not a PGM image this engine accepts; the message says why."""


@dataclass(frozen=True)
class GrayImage:
    """8-bit grayscale pixels, row-major, 0 = black."""

    width: int
    height: int
    pixels: bytes

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise PgmError(f"image must be at least 1x1, got {self.width}x{self.height}")
        if len(self.pixels) != self.width * self.height:
            raise PgmError(f"{len(self.pixels)} pixels for a {self.width}x{self.height} image")


def _header_tokens(data: bytes, count: int) -> tuple[list[bytes], int]:
    """The first count whitespace-separated header tokens (skipping '#' comments) and the offset after them."""
    tokens: list[bytes] = []
    i, n = 0, len(data)
    while len(tokens) < count:
        while i < n and data[i : i + 1].isspace():
            i += 1
        if i >= n:
            raise PgmError("truncated PGM header")
        if data[i : i + 1] == b"#":
            end = data.find(b"\n", i)
            if end < 0:
                raise PgmError("truncated PGM header (comment runs to the end)")
            i = end + 1
            continue
        j = i
        while j < n and not data[j : j + 1].isspace() and data[j : j + 1] != b"#":
            j += 1
        tokens.append(data[i:j])
        i = j
        if len(tokens) == 1 and tokens[0] != b"P5":
            raise PgmError(f"not a binary PGM: magic {tokens[0][:8]!r}, expected b'P5'")
    return tokens, i


def decode_pgm(data: bytes) -> GrayImage:
    """Decode a binary PGM (P5) with maxval ≤ 255; pixel values are rescaled to 0..255.

    Raises:
        PgmError: wrong magic, malformed or truncated header, 16-bit samples, dimensions beyond
            MAX_SIDE/MAX_PIXELS, or a raster that is short or followed by extra bytes.
    """
    if not data.startswith(b"P5"):
        raise PgmError("not a binary PGM: the data must start with 'P5'")
    tokens, end = _header_tokens(data, 4)
    try:
        width, height, maxval = (int(t) for t in tokens[1:4])
    except ValueError:
        raise PgmError(f"PGM header fields must be decimal integers, got {[t[:12] for t in tokens[1:4]]}") from None
    if width <= 0 or height <= 0:
        raise PgmError(f"image must be at least 1x1, got {width}x{height}")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise PgmError(f"image {width}x{height} is too large (at most {MAX_SIDE}x{MAX_SIDE} and {MAX_PIXELS} pixels)")
    if not 0 < maxval < 256:
        raise PgmError(f"maxval {maxval} is not supported (8-bit PGM only: 1..255)")
    if end >= len(data) or not data[end : end + 1].isspace():
        raise PgmError("PGM header must end with one whitespace byte before the raster")
    raster = data[end + 1 :]
    size = width * height
    if len(raster) < size:
        raise PgmError(f"raster is truncated: {len(raster)} of {size} bytes")
    if len(raster) > size:
        raise PgmError(f"{len(raster) - size} unexpected bytes after the raster")
    if maxval != 255:
        table = bytes(min(255, v * 255 // maxval) for v in range(256))
        raster = raster.translate(table)
    return GrayImage(width, height, bytes(raster))


def otsu_threshold(pixels: bytes) -> int:
    """The gray level that best separates ink from paper (values ≤ threshold are ink)."""
    hist = Counter(pixels)
    total = len(pixels)
    sum_all = sum(v * c for v, c in hist.items())
    best_var = -1.0
    first = last = 0
    w_b = 0
    sum_b = 0
    for t in range(256):
        c = hist.get(t, 0)
        w_b += c
        if w_b == 0:
            continue
        w_f = total - w_b
        if w_f == 0:
            break
        sum_b += t * c
        m_b = sum_b / w_b
        m_f = (sum_all - sum_b) / w_f
        var = w_b * w_f * (m_b - m_f) ** 2
        if var > best_var * (1 + 1e-12):
            best_var, first, last = var, t, t
        elif var >= best_var * (1 - 1e-12):
            last = t
    # Every level in an empty valley separates the classes equally well: take the middle, farthest from both.
    return (first + last) // 2


@dataclass
class OcrLine:
    text: str
    confidence: float
    box: tuple[int, int, int, int]
    """x, y, width, height in pixels."""
    top: int = field(default=0, repr=False)


@dataclass
class OcrResult:
    text: str
    lines: list[OcrLine]
    confidence: float
    scale: int
    threshold: int


@dataclass
class _Band:
    top: int
    bottom: int  # inclusive, in eroded coordinates


class _Page:
    """Binary rows, eroded rows and the helpers that read cells out of them."""

    def __init__(self, image: GrayImage, threshold: int) -> None:
        w, h = image.width, image.height
        self.width, self.height = w, h
        table = bytes(1 if v <= threshold else 0 for v in range(256))
        binary = image.pixels.translate(table)
        self.rows = [int.from_bytes(binary[y * w : (y + 1) * w], "big") for y in range(h)]
        horizontal = [r & (r << 8) for r in self.rows]  # pixel and its right neighbour
        self.eroded = [horizontal[y] & horizontal[y + 1] for y in range(h - 1)] + [0]
        self._mask = (1 << (8 * w)) - 1

    def bands(self) -> list[_Band]:
        out: list[_Band] = []
        start = -1
        for y, row in enumerate(self.eroded):
            if row and start < 0:
                start = y
            elif not row and start >= 0:
                out.append(_Band(start, y - 1))
                start = -1
        if start >= 0:
            out.append(_Band(start, self.height - 1))
        return out

    def column_union(self, band: _Band) -> bytes:
        acc = 0
        for y in range(band.top, band.bottom + 1):
            acc |= self.eroded[y]
        return (acc & self._mask).to_bytes(self.width, "big")

    def block_sums(self, top: int, scale: int) -> list[bytes]:
        """For each of the 7 font rows of a cell row starting at pixel row top: byte x = ink count of the
        scale×scale block whose top-left pixel is (x, that font row's first pixel row)."""
        out: list[bytes] = []
        for r in range(HEIGHT):
            vertical = 0
            for y in range(top + r * scale, top + (r + 1) * scale):
                if 0 <= y < self.height:
                    vertical += self.rows[y]
            block = 0
            for j in range(scale):
                block += vertical << (8 * j)
            out.append((block & self._mask).to_bytes(self.width, "big"))
        return out


def _match(pattern: int) -> tuple[str, int, int]:
    """Best glyph for a 35-bit cell pattern, its distance and the runner-up's distance."""
    best_ch, d1, d2 = _UNKNOWN, CELLS + 1, CELLS + 1
    for ch, bits in GLYPHS.items():
        d = (pattern ^ bits).bit_count()
        if d < d1:
            best_ch, d1, d2 = ch, d, d1
        elif d < d2:
            d2 = d
    if d1 > _MAX_GLYPH_DISTANCE:
        return _UNKNOWN, d1, d2
    return best_ch, d1, d2


@dataclass
class _Decoded:
    chars: list[str]
    confidences: list[float]
    score: int


def _decode_cells(
    page: _Page, top: int, scale: int, phase: int, first: int, last: int, union: bytes
) -> _Decoded:
    sums = page.block_sums(top, scale)
    pitch = _CHAR_PITCH * scale
    need = scale * scale // 2 + 1  # a strict majority: one speck in a block never makes ink
    chars: list[str] = []
    confs: list[float] = []
    score = 0
    for k in range(first, last + 1):
        left = phase + k * pitch
        lo, hi = max(0, left), max(0, min(page.width, left + WIDTH * scale))
        if not any(union[lo:hi]):
            chars.append(" ")  # no ink survived erosion here: paper with specks at most
            continue
        pattern = 0
        for r in range(HEIGHT):
            row = sums[r]
            for c in range(WIDTH):
                x = left + c * scale
                if 0 <= x < page.width and row[x] >= need:
                    pattern |= 1 << (r * WIDTH + c)
        if pattern == 0:
            score += CELLS  # ink here that this alignment failed to sample: a wrong alignment
            chars.append(" ")
            continue
        ch, d1, d2 = _match(pattern)
        score += d1
        chars.append(ch)
        confs.append(1.0 if d1 == 0 else max(0.0, 1.0 - 2.0 * d1 / (d1 + d2)))
    return _Decoded(chars, confs, score)


def _grid_phase(unions: list[bytes], scale: int) -> int:
    """The x (mod the character pitch) where character cells start.

    The last font column of every glyph loses its last pixel to erosion and the gap column is never inked,
    so each cell ends in a run of scale+1 empty histogram bins; the cell starts right after it.
    """
    pitch = _CHAR_PITCH * scale
    hist = [0] * pitch
    for union in unions:
        for x, v in enumerate(union):
            if v:
                hist[x % pitch] += 1
    window = scale + 1
    best_start, best_sum = 0, -1
    for start in range(pitch):
        s = sum(hist[(start + j) % pitch] for j in range(window))
        if best_sum < 0 or s < best_sum:
            best_start, best_sum = start, s
    return (best_start + window) % pitch


def recognize(image: GrayImage) -> OcrResult:
    """Read the text of a scan rendered in the built-in font (any scale from 2 px per font pixel up)."""
    threshold = otsu_threshold(image.pixels)
    page = _Page(image, threshold)
    bands = page.bands()
    if not bands:
        return OcrResult("", [], 0.0, 0, threshold)
    tallest = max(b.bottom - b.top + 1 for b in bands)
    scale = round((tallest + 1) / HEIGHT)
    if not MIN_SCALE <= scale <= MAX_SCALE:
        return OcrResult("", [], 0.0, scale, threshold)
    cell_h = HEIGHT * scale - 1  # a full-height glyph's eroded height
    # A line whose glyphs leave a row empty (e.g. only ':') splits into bands: merge what fits one cell.
    merged: list[_Band] = []
    for band in bands:
        if merged and band.bottom - merged[-1].top + 1 <= cell_h:
            merged[-1].bottom = band.bottom
        else:
            merged.append(_Band(band.top, band.bottom))
    unions = [page.column_union(b) for b in merged]
    phase = _grid_phase(unions, scale)
    pitch = _CHAR_PITCH * scale
    spans: list[tuple[int, int] | None] = []
    for union in unions:
        xs = [x for x, v in enumerate(union) if v]
        spans.append(((xs[0] - phase) // pitch, (xs[-1] - phase) // pitch) if xs else None)
    starts = [s[0] for s in spans if s is not None]
    if not starts:
        return OcrResult("", [], 0.0, scale, threshold)
    first_col = min(starts)
    lines: list[OcrLine] = []
    for band, union, span in zip(merged, unions, spans, strict=True):
        if span is None:
            continue
        # The cell's top is where the band fits inside the cell; the slack covers a speck that touches a
        # stroke and survives erosion, stretching the band by a row. The decoding score picks the fit.
        lo, hi = band.bottom - cell_h + 1, band.top
        lo, hi = min(lo, hi) - scale, max(lo, hi) + scale
        candidates = range(lo, hi + 1)
        best: tuple[int, int, _Decoded] | None = None
        for top in candidates:
            decoded = _decode_cells(page, top, scale, phase, first_col, span[1], union)
            if best is None or decoded.score < best[0]:
                best = (decoded.score, top, decoded)
        assert best is not None
        _, top, decoded = best
        text = "".join(decoded.chars).rstrip()
        if not text.strip() or all(ch in (_UNKNOWN, " ") for ch in text):
            continue  # specks that survived erosion, not a line of text
        conf = sum(decoded.confidences) / len(decoded.confidences) if decoded.confidences else 0.0
        x0 = phase + span[0] * pitch
        box = (x0, top, (span[1] - span[0] + 1) * pitch - scale, HEIGHT * scale)
        lines.append(OcrLine(text, round(conf, 4), box, top))
    return OcrResult(_join_lines(lines, scale), lines, _mean_confidence(lines), scale, threshold)


def _join_lines(lines: list[OcrLine], scale: int) -> str:
    """Lines joined with newlines, restoring blank lines from gaps of more than one line pitch."""
    if not lines:
        return ""
    steps = sorted(b.top - a.top for a, b in itertools.pairwise(lines))
    pitch = steps[len(steps) // 2] if steps else HEIGHT * scale
    pitch = max(pitch, HEIGHT * scale)
    parts = [lines[0].text]
    for prev, line in itertools.pairwise(lines):
        parts.append("\n" * max(1, round((line.top - prev.top) / pitch)))
        parts.append(line.text)
    return "".join(parts)


def _mean_confidence(lines: list[OcrLine]) -> float:
    weights = [(len(line.text.replace(" ", "")), line.confidence) for line in lines]
    total = sum(n for n, _ in weights)
    return round(sum(n * c for n, c in weights) / total, 4) if total else 0.0

"""Log lines as JSON, one object a line, carrying the current span's trace and span ids (opt-in).

`HIVEMESH_LOG_FORMAT=json` selects it in every entry point that calls `basic_config`; the default stays the
plain text line. The ids come from the OpenTelemetry context current where the record was made, so a log line
of a traced call joins its trace in the backend (`trace_id`/`span_id`, lowercase hex as W3C writes them).

The text line shows control, bidi and invisible characters as escapes (`hivemesh.mesh.text_clean`): a message or
exception carries mesh data (an agent's name, a capability, a remote's error text), and the line goes to an
operator's terminal, where an ESC sequence in it would be acted on. The JSON line is written ASCII only, every
other character as a `\\u` escape, so DEL, C1 controls and bidi characters reach no terminal raw either (a JSON
reader gets the same text back).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from hivemesh.mesh import tracing
from hivemesh.mesh.text_clean import clean

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ENV = "HIVEMESH_LOG_FORMAT"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (RFC 3339 UTC), level, logger, message, trace/span ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        from hivemesh.mesh.audit.record import utc_iso  # the audit's timestamp form, one format in the mesh

        line: dict[str, Any] = {
            "time": utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = tracing.current_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=True, default=str)  # C1 and bidi characters too, as \u escapes


class TextFormatter(logging.Formatter):
    """The text line (`TEXT_FORMAT`) with control, bidi and invisible characters shown as escapes: in the line,
    newlines and tabs too (a newline in a logged value would forge a line of its own); in the traceback and stack
    after it, all but their own newlines and tabs. A line with none of them is written as logging writes it."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        parts = [clean(self.formatMessage(record))]
        if record.exc_info and not record.exc_text:  # cached as logging caches it, for the other handlers
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # cleaned where written: another handler may have cached it first
            parts.append(clean(record.exc_text, layout=True))
        if record.stack_info:
            parts.append(clean(self.formatStack(record.stack_info), layout=True))
        return "\n".join(parts)


def basic_config(level: int, env: dict[str, str] | None = None) -> None:
    """logging.basicConfig, in JSON when HIVEMESH_LOG_FORMAT=json (else the text line); bad values fail loudly."""
    fmt = (os.environ if env is None else env).get(ENV, "text").strip().lower() or "text"
    if fmt not in ("text", "json"):
        raise ValueError(f"{ENV}={fmt!r}: use text or json")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler])

"""Log lines as JSON, one object a line, carrying the current span's trace and span ids (opt-in).

`HIVEMESH_LOG_FORMAT=json` selects it in every entry point that calls `basic_config`; the default stays the
plain text line. The ids come from the OpenTelemetry context current where the record was made, so a log line
of a traced call joins its trace in the backend (`trace_id`/`span_id`, lowercase hex as W3C writes them).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from hivemesh.mesh import tracing

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
        return json.dumps(line, ensure_ascii=False, default=str)


def basic_config(level: int, env: dict[str, str] | None = None) -> None:
    """logging.basicConfig, in JSON when HIVEMESH_LOG_FORMAT=json (else the text line); bad values fail loudly."""
    fmt = (os.environ if env is None else env).get(ENV, "text").strip().lower() or "text"
    if fmt not in ("text", "json"):
        raise ValueError(f"{ENV}={fmt!r}: use text or json")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])

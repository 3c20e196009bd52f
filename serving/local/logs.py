"""Log formats of the stack's processes: Rich text for a terminal (the default) or JSON
lines (`gem --log-format json`, or $GEM_LOG_FORMAT), one object per record, for a log
pipeline. The choice travels in the environment, so every process the stack starts (Ray's
workers inherit it) logs the same way; Ray Serve's own logs (controller, proxy, replicas,
their per-call access lines with the `request_id`) take it through Serve's LoggingConfig."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
LOG_FORMAT_ENV = "GEM_LOG_FORMAT"
# LogRecord attributes that are not a record's own extra fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def log_format() -> LogFormat:
    value = os.environ.get(LOG_FORMAT_ENV, "text").lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"${LOG_FORMAT_ENV} must be one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value


class JSONFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the
    exception's text if any, and the record's extra fields (e.g. `request_id`)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        doc |= {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        return json.dumps(doc, default=str)


def serve_logging_config():
    """Ray Serve's LoggingConfig for the chosen format (JSON encoding: every line an
    object, with Serve's `request_id` on the lines of a call)."""
    from ray.serve.schema import LoggingConfig

    return LoggingConfig(encoding="JSON" if log_format() == "json" else "TEXT")

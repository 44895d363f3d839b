"""Log lines of every daemon: to stderr (or a file), with level, logger and the peer id
in the message; optionally one JSON object per line for log shippers. The library's own
lines (libp2p logs a refused dial at ERROR, once per attempt) show only with -v, labelled
by their logger name."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_logging(verbose: bool = False, *, level: int | str = logging.INFO, file: str | Path | None = None,
                  json_lines: bool = False) -> None:
    """Our lines at `level` (DEBUG with -v); the library's only when verbose."""
    from .p2p.host import quiet_libp2p_logs

    if isinstance(level, str):
        level = getattr(logging, level.upper())
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if json_lines else
                         logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else level)
    quiet_libp2p_logs(logging.WARNING if verbose else logging.CRITICAL)

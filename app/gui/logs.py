"""The desktop client's log file: platformdirs.user_log_dir("radcrypt")/radcrypt.log,
rotated at 1 MB (three old files kept).

What goes there: start-up, connections, every Activity entry, every error shown to the
user with its details, and warnings of the libraries. Never a secret: nothing logs a
password or key, and a filter blanks the value after words such as "password" or
"secret" anyway, in case an exception message quotes one.
"""

from __future__ import annotations

import logging
import re
from logging.handlers import RotatingFileHandler
from pathlib import Path

import platformdirs

LOG_NAME = "radcrypt.log"
MAX_BYTES = 1_000_000
BACKUPS = 3
FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"
_SECRET = re.compile(
    r"(?i)\b(password|passphrase|secret(?:_access_key)?|session_token|authorization|"
    r"private[_ ]key)(\s*[=:]\s*|\s+)(\"[^\"]*\"|'[^']*'|\S+)")


def log_dir() -> Path:
    return Path(platformdirs.user_log_dir("radcrypt", appauthor=False))


def redact(text: str) -> str:
    """``text`` with the value after a secret's name replaced by [redacted]."""
    return _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}[redacted]", text)


class RedactSecrets(logging.Filter):
    """Blanks secret values in the formatted message (arguments included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))  # tracebacks too


def start_logging(directory: Path | None = None, level: int = logging.INFO
                  ) -> RotatingFileHandler:
    """Attach the rotating log file to the root logger; returns its handler (give it to
    ``stop_logging``). The folder is created private to the user."""
    folder = directory or log_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    handler = RotatingFileHandler(folder / LOG_NAME, maxBytes=MAX_BYTES,
                                  backupCount=BACKUPS, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(_Formatter(FORMAT))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    logging.getLogger(__name__).info("Radcrypt desktop started; log file %s",
                                     handler.baseFilename)
    return handler


def stop_logging(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()

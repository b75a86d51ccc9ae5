"""Where the client keeps its settings and data, and how flags and the environment win.

Precedence, lowest first: built-in defaults, the configuration file in the user's config
directory (platformdirs, so XDG_CONFIG_HOME isolates tests), RADCRYPT_* environment
variables, then explicit overrides (command-line flags, GUI fields). No secret is ever
stored here: S3 credentials come from boto3's usual sources, passwords from the user.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import platformdirs

from app.core.errors import RadcryptError

APP_NAME = "radcrypt"
EMBEDDED = "embedded"  # SeaweedFS on this workstation, in the data directory (persistent)
DIRECTORY = "directory"  # objects as files under <data dir>/objects (cloud/directory_store.py)
MEMORY = "memory"  # moto in this process: nothing is kept (tests; needs the dev extra)
S3 = "s3"  # an S3 endpoint (endpoint_url; empty: AWS S3)
STORES = (EMBEDDED, DIRECTORY, MEMORY, S3)
STORE_ALIASES = {"local": EMBEDDED}  # the old name of the embedded store, still accepted
LOCAL = EMBEDDED  # the old constant's name, for callers that compare with it
_ENV = {
    "store": "RADCRYPT_STORE",
    "endpoint_url": "RADCRYPT_ENDPOINT",
    "bucket": "RADCRYPT_BUCKET",
    "region": "RADCRYPT_REGION",
    "profile": "RADCRYPT_PROFILE",
    "service_url": "RADCRYPT_SERVICE_URL",
    "workers": "RADCRYPT_WORKERS",
    "data_dir": "RADCRYPT_DATA_DIR",
    "lock_minutes": "RADCRYPT_LOCK_MINUTES",
}
# The desktop client locks itself after this many minutes without keyboard or mouse use
# (app/gui/idle_lock.py); a hospital may shorten it, never switch it off: a workstation
# left unlocked in a reading room is the risk it answers (docs/PRIVACY.md).
DEFAULT_LOCK_MINUTES = 10
MAX_LOCK_MINUTES = 240


@dataclass(frozen=True)
class Settings:
    """Everything a session needs to find its storage and its search service."""

    store: str = EMBEDDED  # "embedded" (SeaweedFS), "directory", "memory" (nothing kept), "s3"
    endpoint_url: str | None = None
    bucket: str = "radcrypt"
    region: str = "us-east-1"
    profile: str | None = None
    service_url: str | None = None  # None: start a service for the session's duration
    workers: int = 2
    data_dir: str = ""
    lock_minutes: int = DEFAULT_LOCK_MINUTES  # idle minutes before the desktop client locks

    def __post_init__(self) -> None:  # the old name "local" means the embedded store
        object.__setattr__(self, "store", STORE_ALIASES.get(self.store, self.store))

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    @property
    def store_dir(self) -> Path:
        return self.data_path / "store"

    @property
    def objects_dir(self) -> Path:
        """Where the directory store keeps its objects (--store directory, and the
        embedded store where SeaweedFS has no binary for the platform)."""
        return self.data_path / "objects"

    def with_overrides(self, **values: Any) -> Settings:
        return replace(self, **{k: v for k, v in values.items() if v is not None})


def default_config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME))


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME))


def config_file() -> Path:
    return default_config_dir() / "config.json"


def _whole(value: Any, source: str, name: str, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise RadcryptError(f"{source}: {name} must be a whole number")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise RadcryptError(f"{source}: {name} must be a whole number") from None
    if not low <= number <= high:
        raise RadcryptError(f"{source}: {name} must be between {low} and {high}")
    return number


def _coerce(name: str, value: Any, source: str) -> Any:
    if name == "lock_minutes":
        return _whole(value, source, "lock_minutes (idle minutes before the lock)", 1,
                      MAX_LOCK_MINUTES)
    if name == "workers":
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise RadcryptError(f"{source}: workers must be a whole number") from None
        if not 1 <= number <= 64:
            raise RadcryptError(f"{source}: workers must be between 1 and 64")
        return number
    if value is not None and not isinstance(value, str):
        raise RadcryptError(f"{source}: {name} must be a string")
    if name == "store":
        value = STORE_ALIASES.get(value, value) if isinstance(value, str) else value
        if value not in STORES:
            raise RadcryptError(f"{source}: store must be 'embedded', 'memory' or 's3' (or "
                                f"'directory': files in the data directory), not {value!r}")
    return value


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Defaults < config file < environment < overrides; clear errors name the source."""
    values: dict[str, Any] = {}
    file = path or config_file()
    known = {f.name for f in fields(Settings)}
    if file.exists():
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RadcryptError(f"cannot read settings file {file}: {exc}") from None
        if not isinstance(data, dict):
            raise RadcryptError(f"settings file {file}: expected a JSON object")
        for name, value in data.items():
            if name not in known:
                raise RadcryptError(f"settings file {file}: unknown setting {name!r}")
            values[name] = _coerce(name, value, f"settings file {file}")
    for name, variable in _ENV.items():
        if os.environ.get(variable):
            values[name] = _coerce(name, os.environ[variable], f"environment {variable}")
    for name, value in overrides.items():
        if value is not None:
            values[name] = _coerce(name, value, f"option {name}")
    return Settings(**values)


def save_settings(settings: Settings, path: Path | None = None) -> Path:
    """Write the settings file (no secrets in it by construction)."""
    file = path or config_file()
    file.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in asdict(settings).items() if v not in (None, "")}
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(file)
    return file

"""What every CLI topic module shares: exit codes, settings and the password, the
unlocked client, JSON-or-text output, the progress bar, usage errors, the global options
and the subcommand wrapper (``_command``), and the exception -> exit code mapping.

Why a module of its own: app/cli.py registers the topic modules (app/cli_pacs.py,
app/cli_fhir.py, app/cli_keywords.py), so they cannot import it back (an import cycle,
tests/test_architecture.py); they and app.cli import these helpers from here, and app.cli
re-exports them under their old names. Nothing here knows a subcommand.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.core import client as facade
from app.core.errors import RadcryptError, RepositoryNotFound, WrongPassword
from app.core.progress import ProgressEvent
from app.core.settings import Settings, load_settings

JSON_SCHEMA = 1
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_NOT_FOUND = 10
EXIT_WRONG_PASSWORD = 12
EXIT_INTERRUPTED = 130


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(store=args.store, endpoint_url=args.endpoint, bucket=args.bucket,
                         service_url=args.service_url, data_dir=args.data_dir,
                         workers=args.workers)


def _password_from_command(command: str) -> str:
    """The first line of a command's standard output (like restic's --password-command).
    The command is split like a shell would (shlex) but run without one, unless the user
    wrote one (e.g. ``sh -c '...'``); its stderr goes to ours, its output is never shown."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise RadcryptError(f"cannot parse --password-command: {exc}") from None
    if not argv:
        raise RadcryptError("--password-command is empty")
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              check=False, timeout=300)
    except FileNotFoundError:
        raise RadcryptError(f"--password-command: no such program {argv[0]!r}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RadcryptError(f"--password-command {argv[0]!r} failed: "
                            f"{type(exc).__name__}") from None
    if done.returncode != 0:
        raise RadcryptError(f"--password-command {argv[0]!r} failed with exit status "
                            f"{done.returncode}")
    try:
        text = done.stdout.decode("utf-8")
    except UnicodeDecodeError:
        raise RadcryptError(f"--password-command {argv[0]!r} printed something that is not "
                            "UTF-8 text") from None
    return text.splitlines()[0] if text.splitlines() else ""


def _password(args: argparse.Namespace, confirm: bool = False, prompt: str = "Password: "
              ) -> str:
    """--password-file, else --password-command, else RADCRYPT_PASSWORD, else a prompt
    (twice when ``confirm``)."""
    return _secret(file=args.password_file, command=args.password_command,
                   env="RADCRYPT_PASSWORD", prompt=prompt, confirm=confirm, kind="password",
                   name="password", sources="--password-file, --password-command, "
                   "RADCRYPT_PASSWORD")


def _secret(*, file: str | None, env: str, prompt: str, confirm: bool, kind: str, name: str,
            sources: str, command: str | None = None) -> str:
    """A secret from ``file`` (its first line), else ``command``'s output, else the
    environment variable ``env``, else asked on the terminal (twice when ``confirm``);
    never empty. One order for the identity password and the backup passphrase (app.cli),
    so that both are read, and refused, alike. ``kind`` names the file and the mismatch
    ("password file", "two passwords differ"), ``name`` the secret, ``sources`` the ways
    to give it without a terminal."""
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise RadcryptError(f"cannot read {kind} file {file}: {exc.strerror}") from None
        secret = text.rstrip("\r\n")
    elif command:
        secret = _password_from_command(command)
    elif os.environ.get(env):
        secret = os.environ[env]
    elif sys.stdin.isatty():
        secret = getpass.getpass(prompt)
        if confirm and getpass.getpass("Again: ") != secret:
            raise RadcryptError(f"the two {kind}s differ")
    else:
        raise RadcryptError(f"a {name} is needed: use {sources} or run in a terminal")
    if not secret:
        raise RadcryptError(f"the {name} is empty")
    return secret


def _emit(args: argparse.Namespace, data: dict[str, Any], text: Callable[[], object]
          ) -> None:
    """JSON (one object, "schema": 1 first) with --json, else the text."""
    if getattr(args, "json", False):
        print(json.dumps({"schema": JSON_SCHEMA, **data}, indent=2))
    else:
        text()


@contextmanager
def _progress(enabled: bool, description: str, unit: str = "files"
              ) -> Iterator[Callable[[ProgressEvent], None]]:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield lambda event: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TimeRemainingColumn,
    )

    count = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
    with Progress("[progress.description]{task.description}", BarColumn(), count,
                  TimeRemainingColumn(), console=Console(stderr=True),
                  transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(event: ProgressEvent) -> None:
            label = f"{description} {Path(event.item).name}" if unit == "files" else description
            bar.update(task, completed=event.done, total=event.total or None,
                       description=label[:60])

        yield update


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[facade.Client]:
    """The facade, with this workstation's identity unlocked by the password."""
    settings = _settings(args)
    if not facade.identity_exists(settings):
        raise RadcryptError(facade.NO_IDENTITY)
    with facade.Client.unlock(settings, _password(args)) as client:
        yield client


def _usage(args: argparse.Namespace, message: str) -> None:
    """A usage error (exit 2) of the running subcommand, with its usage line."""
    parser: argparse.ArgumentParser = args.parser
    parser.error(message)


# --- parser -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


_GLOBAL_HELP = {
    "--store": "where the data lives: embedded (SeaweedFS on this workstation, the "
               "default; 'local' is its old name), directory (files in the data directory, "
               "no server), s3 (an S3 endpoint, see --endpoint) or memory (nothing is kept; "
               "tests, needs the dev extra)",
    "--endpoint": "S3 endpoint URL (with --store s3; empty: AWS S3)",
    "--bucket": "bucket name (default radcrypt)",
    "--service-url": "search service URL (default: start one on this workstation)",
    "--data-dir": "data directory: identity, embedded store, pinned owners (default: the "
                  "user data directory)",
    "--workers": "parallel decoding workers for import (1 to 64)",
    "--password-file": "read the identity password from the first line of this file",
    "--password-command": "run this command and read the identity password from its "
                          "standard output (split like a shell, run without one)",
    "--verbose": "log more (to stderr)",
    "--json": "print one JSON object (with \"schema\": 1) instead of text",
}


def _add_globals(parser: argparse.ArgumentParser, top: bool, json_flag: bool = True
                 ) -> None:
    """The global options, on the top parser (with defaults) and again on every
    subcommand (defaults suppressed, so a value given before the subcommand is kept)."""
    group = parser.add_argument_group("global options (before or after the command)")

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group.add_argument("--store", choices=["embedded", "directory", "memory", "s3", "local"],
                       default=default(None), help=_GLOBAL_HELP["--store"])
    group.add_argument("--endpoint", metavar="URL", default=default(None),
                       help=_GLOBAL_HELP["--endpoint"])
    group.add_argument("--bucket", metavar="NAME", default=default(None),
                       help=_GLOBAL_HELP["--bucket"])
    group.add_argument("--service-url", metavar="URL", default=default(None),
                       help=_GLOBAL_HELP["--service-url"])
    group.add_argument("--data-dir", metavar="DIR", default=default(None),
                       help=_GLOBAL_HELP["--data-dir"])
    group.add_argument("--workers", type=_positive_int, metavar="N", default=default(None),
                       help=_GLOBAL_HELP["--workers"])
    group.add_argument("--password-file", metavar="FILE", default=default(None),
                       help=_GLOBAL_HELP["--password-file"])
    group.add_argument("--password-command", metavar="CMD", default=default(None),
                       help=_GLOBAL_HELP["--password-command"])
    group.add_argument("-v", "--verbose", action="store_true", default=default(False),
                       help=_GLOBAL_HELP["--verbose"])
    if json_flag:
        group.add_argument("--json", action="store_true", default=default(False),
                           help=_GLOBAL_HELP["--json"])


def _command(sub: Any, name: str, help: str, func: Callable[[argparse.Namespace], int],
             json_flag: bool = True, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand ``name`` that runs ``func``, with the global options again (so they
    may follow the subcommand) and its own parser kept for ``_usage``."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help,
                                                     **kwargs)
    _add_globals(parser, top=False, json_flag=json_flag)
    parser.set_defaults(func=func, parser=parser)
    return parser


def _exit_code(exc: BaseException) -> int:
    """The exit status of an expected error (the table in app/cli.py's docstring)."""
    if isinstance(exc, WrongPassword):
        return EXIT_WRONG_PASSWORD
    if isinstance(exc, RepositoryNotFound):
        return EXIT_NOT_FOUND
    return EXIT_ERROR

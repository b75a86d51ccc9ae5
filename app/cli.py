"""The command-line front: parses, asks for passwords, shows progress, calls app/core.

Exit codes: 0 success, 2 usage error (argparse), 1 any other failure, with one clear
line on stderr and no traceback (set RADCRYPT_DEBUG=1 for one).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.core.errors import RadcryptError
from app.core.progress import ProgressEvent
from app.core.settings import Settings, load_settings
from cloud.store import StoreError

log = logging.getLogger("radcrypt")


# --- helpers ----------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(store=args.store, endpoint_url=args.endpoint, bucket=args.bucket,
                         service_url=args.service_url, data_dir=args.data_dir,
                         workers=args.workers)


def _password(args: argparse.Namespace, confirm: bool = False) -> str:
    """--password-file, else RADCRYPT_PASSWORD, else a prompt (twice when creating)."""
    if args.password_file:
        try:
            text = Path(args.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise RadcryptError(f"cannot read password file {args.password_file}: "
                                f"{exc.strerror}") from None
        password = text.rstrip("\r\n")
    elif os.environ.get("RADCRYPT_PASSWORD"):
        password = os.environ["RADCRYPT_PASSWORD"]
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Password again: ") != password:
            raise RadcryptError("the two passwords differ")
    else:
        raise RadcryptError("a password is needed: use --password-file, RADCRYPT_PASSWORD "
                            "or run in a terminal")
    if not password:
        raise RadcryptError("the password is empty")
    return password


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2))
    else:
        text()


@contextmanager
def _progress(enabled: bool, description: str) -> Iterator[Callable[[ProgressEvent], None]]:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield lambda event: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(event: ProgressEvent) -> None:
            bar.update(task, completed=event.done, total=event.total or None,
                       description=f"{description} {Path(event.item).name}"[:60])

        yield update


def _identity_store(settings: Settings) -> Any:
    from app.core.identity import IdentityStore

    return IdentityStore(settings.data_path)


NO_IDENTITY = ("no identity on this workstation: run 'radcrypt identity create' first "
               "(repositories belong to identities; password-only repositories are no longer "
               "created or opened, 'radcrypt repo migrate' converts an old one)")


@contextmanager
def _open_session(args: argparse.Namespace) -> Iterator[tuple[Any, Any]]:
    """(session, identity): the identity on this workstation, unlocked with the password;
    requests are signed and repositories open through the owner-signed grants only."""
    from app.core.access import session_for

    settings = _settings(args)
    store = _identity_store(settings)
    if not store.exists():
        raise RadcryptError(NO_IDENTITY)
    identity = store.unlock(_password(args))
    with session_for(settings, identity) as session:
        yield session, identity


def _open_repo(args: argparse.Namespace, session: Any, identity: Any, name: str) -> Any:
    from app.core.access import open_repository_as

    return open_repository_as(session, identity, name)


# --- commands ---------------------------------------------------------------------------


def cmd_store(args: argparse.Namespace) -> int:
    from cloud.local import EmbeddedStoreError

    try:
        return _store_action(args)
    except EmbeddedStoreError as exc:  # e.g. SeaweedFS cannot run here: one clear line
        raise RadcryptError(str(exc)) from None


def _store_action(args: argparse.Namespace) -> int:
    from app.core.settings import MEMORY
    from cloud.local import CREDENTIALS_FILE, find_running, start_embedded_store, stop_background

    settings = _settings(args)
    data_dir = settings.store_dir
    if settings.store == MEMORY:  # nothing to start or find: it lives inside one command
        if args.action == "start":
            raise RadcryptError("the in-memory store cannot be started in the background: it "
                                "lives inside the command that uses it and keeps nothing; "
                                "use --store embedded (SeaweedFS) or --store s3")
        _emit(args, {"running": False, "kind": MEMORY, "kept": False},
              lambda: print("in-memory store: each command has its own, and nothing is kept"))
        return 0
    if args.action == "start":
        handle = find_running(data_dir) or start_embedded_store(data_dir, background=True)
    elif args.action == "stop":
        stopped = stop_background(data_dir)
        _emit(args, {"stopped": stopped},
              lambda: print("embedded store stopped" if stopped else "no embedded store running"))
        return 0
    else:
        handle = find_running(data_dir)
        if handle is None:
            _emit(args, {"running": False, "data_dir": str(data_dir)},
                  lambda: print(f"no embedded store running for {data_dir}"))
            return 0
    # The access key names the credentials; the secret key is printed only when asked.
    info = {"running": True, "kind": handle.kind, "pid": handle.pid,
            "endpoint": handle.endpoint_url, "bucket": handle.bucket,
            "access_key": handle.access_key, "data_dir": str(handle.data_dir),
            "credentials_file": str(handle.data_dir / CREDENTIALS_FILE)}
    if args.show_credentials:
        info["secret_key"] = handle.secret_key

    def text() -> None:
        print(f"embedded store ({handle.kind}) at {handle.endpoint_url}, bucket "
              f"{handle.bucket}, pid {handle.pid}, data in {handle.data_dir}")
        if args.show_credentials:
            print(f"access key {handle.access_key}\nsecret key {handle.secret_key}")

    _emit(args, info, text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The same function as `python -m cloud.service` (cloud/service.py run_service), with
    the store of this command's settings instead of RADCRYPT_S3_*."""
    from app.core.session import Session
    from cloud.service import run_service

    @contextmanager
    def open_store() -> Iterator[Any]:
        with Session(_settings(args)) as session:
            print(f"store {session.store_config.endpoint_url if session.store_config else ''}",
                  file=sys.stderr)
            yield session.store

    return run_service(args, open_store)


def cmd_repo(args: argparse.Namespace) -> int:
    from app.core.access import create_repository_as
    from app.core.repository import list_repositories

    if args.action == "list":
        from app.core.session import Session

        with Session(_settings(args)) as session:
            manifests = list_repositories(session.store)
        _emit(args, [json.loads(m.to_json()) for m in manifests],
              lambda: [print(f"{m.repo_id}\t{m.extractor}\tkey v{m.key_version}\t"
                             f"{m.created}") for m in manifests])
        return 0
    with _open_session(args) as (session, identity):
        if args.action == "create":
            repo = create_repository_as(session, identity, args.name, args.extractor,
                                        bound_levels=args.bound_levels)
            m = repo.manifest
            _emit(args, json.loads(m.to_json()),
                  lambda: print(f"created repository {m.repo_id} (extractor {m.extractor}, "
                                f"key version {m.key_version})"))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from app.core.importer import Importer

    settings = _settings(args)
    with _open_session(args) as (session, identity):
        repo = _open_repo(args, session, identity, args.repo)
        with _progress(not args.json, "importing") as progress:
            report = Importer(session.store, repo, workers=settings.workers,
                              batch_size=args.batch_size, progress=progress).run(args.paths)
        if settings.service_url:
            try:
                session.service.refresh(repo.repo_id)
            except RadcryptError as exc:
                log.warning("imported, but the search service was not told: %s", exc)

        def text() -> None:
            print(f"imported {len(report.imported)}, already present "
                  f"{len(report.already_present)}, failed {len(report.failed)} "
                  f"in {report.seconds:.1f} s")
            for _, reason in report.failed:
                print(f"  failed: {reason}", file=sys.stderr)

        _emit(args, report.as_dict(), text)
    return 1 if report.failed and not report.imported and not report.already_present else 0


def cmd_search(args: argparse.Namespace) -> int:
    from app.core.searcher import search_files

    with _open_session(args) as (session, identity):
        repo = _open_repo(args, session, identity, args.repo)
        results = search_files(session, repo, args.images, k=args.k)

        def text() -> None:
            for result in results:
                print(f"{result.query}:")
                for hit in result.hits:
                    print(f"  {hit.rank:>3}. {hit.name}  distance {hit.distance:.6g}  "
                          f"id {hit.image_id}")
                server = result.stats.get("milliseconds", 0.0)
                print(f"     searched {result.stats.get('vectors', 0)} images, "
                      f"{result.stats.get('full_scored', 0)} fully scored, "
                      f"engine {server:.2f} ms")

        _emit(args, {"queries": [r.as_dict() for r in results]}, text)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from app.core.objects import fetch_original
    from cloud import layout

    try:
        image_id = layout.validate_image_id(args.image_id)
    except ValueError as exc:
        raise RadcryptError(str(exc)) from None
    with _open_session(args) as (session, identity):
        repo = _open_repo(args, session, identity, args.repo)
        size = fetch_original(session.store, repo.ring, repo.repo_id, image_id, Path(args.output))
    print(f"wrote {args.output} ({size} bytes, integrity verified)", file=sys.stderr)
    return 0


def cmd_identity(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _identity_store(settings)
    if args.action == "create":
        from app.core.identity import check_new_password

        if not args.name:
            raise RadcryptError("identity create needs --name")
        password = _password(args, confirm=True)
        words = check_new_password(password, args.name)  # zxcvbn score >= 3, or why not
        identity = store.create(args.name, password)
        card = identity.card()
        print(f"created identity {identity.user_id} (password {words}); "
              f"fingerprint {card.fingerprint}", file=sys.stderr)
    card = store.card()
    if args.action == "export":
        if args.output:
            Path(args.output).write_text(card.to_json(), encoding="utf-8")
            print(f"wrote your public card to {args.output}; give it to the data owner",
                  file=sys.stderr)
        else:
            print(card.to_json())
        return 0
    info = {"user_id": card.user_id, "name": card.name, "fingerprint": card.fingerprint,
            "identity_file": str(store.path)}
    _emit(args, info, lambda: print(f"{card.name} ({card.user_id}), fingerprint "
                                    f"{card.fingerprint}"))
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    from app.core.access import register_user

    try:
        text = Path(args.card).read_text(encoding="utf-8")
    except OSError as exc:
        raise RadcryptError(f"cannot read card {args.card}: {exc.strerror}") from None
    with _open_session(args) as (session, identity):
        record = register_user(session, identity, text)
    _emit(args, record.__dict__, lambda: print(f"registered {record.name} ({record.user_id}), "
                                               f"fingerprint {record.fingerprint}"))
    return 0


def cmd_access(args: argparse.Namespace) -> int:
    from app.core.access import (
        grant_access,
        list_access,
        migrate_password_repository,
        revoke_access,
    )

    with _open_session(args) as (session, identity):
        if args.action == "migrate":
            old = os.environ.get("RADCRYPT_OLD_PASSWORD")
            if args.old_password_file:
                old = Path(args.old_password_file).read_text(encoding="utf-8").rstrip("\r\n")
            # a password repository needs its old password (--old-password-file or
            # RADCRYPT_OLD_PASSWORD); an owner-signed one without members needs none
            repo = migrate_password_repository(session, identity, args.name, old or None)
            print(f"repository {repo.repo_id} now belongs to {identity.user_id} "
                  f"(members: {', '.join(m.user_id for m in repo.manifest.members)})")
            return 0
        repo = _open_repo(args, session, identity, args.name)
        if args.action == "grant":
            grant_access(session, identity, repo, args.user)
            print(f"granted {args.user} access to {repo.repo_id} "
                  f"(key version {repo.manifest.key_version})")
        elif args.action == "revoke":
            repo = revoke_access(session, identity, repo, args.user)
            print(f"revoked {args.user}; {repo.repo_id} is now at key version "
                  f"{repo.manifest.key_version}")
        entries = list_access(session, repo.repo_id)
        if args.action == "access":
            _emit(args, [e.__dict__ for e in entries],
                  lambda: [print(f"{e.user_id}\t{e.name}\tkey v{e.key_version}"
                                 + ("" if e.status == "ok" else f"\t({e.status})"))
                           for e in entries])
            if entries.ignored:
                print(f"ignored under grants/ (not members, or not signed by the owner): "
                      f"{', '.join(map(repr, entries.ignored))}", file=sys.stderr)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from cloud.audit import read_audit

    with _open_session(args) as (session, identity):
        repo = _open_repo(args, session, identity, args.repo)
        entries = read_audit(session.store, repo.repo_id)
    _emit(args, entries, lambda: [print(f"{e.get('time')}  {e.get('user')}  {e.get('action')}"
                                        f"  results={e.get('results')}  "
                                        f"{e.get('duration_ms')} ms") for e in entries])
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from app.imaging.features import get_extractor
    from app.imaging.worker import DecoderPool

    get_extractor(args.extractor)  # an unknown name fails before any child starts
    with DecoderPool(1) as pool:  # untrusted files: decoded in a memory-limited child
        rows = [{"path": p, "vector": [float(x) for x in pool.features(p, args.extractor)]}
                for p in args.images]
    _emit(args, {"extractor": args.extractor, "features": rows},
          lambda: [print(r["path"], " ".join(f"{x:.5g}" for x in r["vector"])) for r in rows])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from app.core.demo import run_demo

    settings = _settings(args)
    with tempfile.TemporaryDirectory(prefix="radcrypt-demo-") as tmp:
        work = Path(tmp)
        if not args.data_dir:  # a throw-away store unless the user chose one
            settings = settings.with_overrides(data_dir=str(work / "data"),
                                               store=args.store or "embedded", service_url="")
        where = {"embedded": "embedded S3 store (SeaweedFS)", "s3": "S3 store",
                 "memory": "in-memory store (nothing is kept)"}.get(settings.store, "store")
        print(f"Radcrypt demo: {where}, search service, fresh repository, "
              f"{args.images} sample images, {args.queries} perturbed queries", file=sys.stderr)
        with _progress(True, "importing") as progress:
            report = run_demo(settings, work, count=args.images, queries=args.queries,
                              progress=progress)
    print(f"imported {report.images} images in {report.import_seconds:.1f} s")
    print(f"{'query':<34} {'expected':<28} {'returned':<28} {'distance':>10} {'ms':>8}  ok")
    for row in report.rows:
        print(f"{row.query[:34]:<34} {row.expected[:28]:<28} {row.returned[:28]:<28} "
              f"{row.distance:10.4g} {row.milliseconds:8.1f}  {'yes' if row.matched else 'NO'}")
    matched = sum(r.matched for r in report.rows)
    print(f"matched {matched}/{len(report.rows)}; agreement with plaintext search over the "
          f"same features: {report.agreement:.3f}")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report.as_dict(), indent=2))
    return 0 if report.all_matched and report.agreement == 1.0 else 1


# --- parser -----------------------------------------------------------------------------

DEFAULT_BATCH = 64  # app.core.importer.DEFAULT_BATCH, without importing numpy for --help


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value



def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", choices=["embedded", "memory", "s3", "local"],
                        help="embedded: SeaweedFS on this workstation (default; 'local' is its "
                        "old name); s3: an S3 endpoint (--endpoint URL); memory: nothing is "
                        "kept (tests; needs the dev extra)")
    common.add_argument("--endpoint", help="S3 endpoint URL (with --store s3)")
    common.add_argument("--bucket", help="bucket name")
    common.add_argument("--service-url", help="search service URL (default: start one)")
    common.add_argument("--data-dir", help="data directory (default: the user data dir)")
    common.add_argument("--workers", type=int, help="parallel workers for import")
    common.add_argument("--password-file", help="read the password from this file")
    common.add_argument("-v", "--verbose", action="store_true", help="log more")

    parser = argparse.ArgumentParser(prog="radcrypt", description="Encrypted image archive "
                                     "search: the cloud stores and matches only ciphertext.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("store", parents=[common], help="the embedded S3 store")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--show-credentials", action="store_true",
                   help="also print the S3 secret key (never printed otherwise)")
    p.set_defaults(func=cmd_store)

    p = sub.add_parser("serve", parents=[common], help="run the search service")
    from cloud.service_options import add_service_arguments

    add_service_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("repo", parents=[common], help="create or list repositories")
    repo_sub = p.add_subparsers(dest="action", required=True)
    c = repo_sub.add_parser("create", parents=[common], help="a new repository (new keys)")
    c.add_argument("name")
    c.add_argument("--extractor", default="radcrypt-v1")
    c.add_argument("--bound-levels", choices=("auto", "off"), default="auto",
                   help="off: no bound levels (searches scan every full vector, slower; a "
                        "known-plaintext attacker then needs d + 1 known images, see "
                        "SECURITY.md)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_repo)
    c = repo_sub.add_parser("list", parents=[common], help="list repositories")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_repo)

    for action in ("grant", "revoke"):
        c = repo_sub.add_parser(action, parents=[common], help=f"{action} a user's access")
        c.add_argument("name")
        c.add_argument("user")
        c.set_defaults(func=cmd_access)
    c = repo_sub.add_parser("access", parents=[common], help="who has access")
    c.add_argument("name")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_access)
    c = repo_sub.add_parser("migrate", parents=[common],
                            help="give an old repository (password-locked, or signed "
                                 "without members) an owner-signed membership list")
    c.add_argument("name")
    c.add_argument("--old-password-file")
    c.set_defaults(func=cmd_access)

    p = sub.add_parser("identity", parents=[common], help="your identity on this workstation")
    p.add_argument("action", choices=["create", "show", "export"])
    p.add_argument("--name", help="your name (create)")
    p.add_argument("-o", "--output", help="write the public card here (export)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_identity)

    p = sub.add_parser("user", parents=[common], help="users of your repositories")
    user_sub = p.add_subparsers(dest="action", required=True)
    c = user_sub.add_parser("register", parents=[common], help="register a public card")
    c.add_argument("card")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_user)

    p = sub.add_parser("audit", parents=[common], help="the search service's audit trail")
    p.add_argument("--repo", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("import", parents=[common], help="import files or folders")
    p.add_argument("--repo", required=True)
    p.add_argument("paths", nargs="+")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH, metavar="N",
                   help=f"images per index segment, the unit of commit and resume "
                        f"(default {DEFAULT_BATCH})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("search", parents=[common], help="nearest archived images")
    p.add_argument("--repo", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("-k", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("get", parents=[common], help="download and decrypt an original")
    p.add_argument("--repo", required=True)
    p.add_argument("image_id")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("features", parents=[common], help="plaintext features, locally")
    p.add_argument("images", nargs="+")
    p.add_argument("--extractor", default="radcrypt-v1")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("demo", parents=[common], help="end-to-end demonstration")
    p.add_argument("--json", dest="json_file", metavar="FILE", help="write the report here")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--queries", type=int, default=20)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # pydicom narrates every quirk of a file it still decodes
        import pydicom  # its import sets its own logger's level: quieten it afterwards

        logging.getLogger(pydicom.__name__).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="pydicom")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("radcrypt: interrupted; finished work is kept, run the command again to resume",
              file=sys.stderr)
        return 1
    except (RadcryptError, StoreError, ValueError, OSError) as exc:
        if os.environ.get("RADCRYPT_DEBUG"):
            raise
        print(f"radcrypt: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the one line promised, whatever failed
        if os.environ.get("RADCRYPT_DEBUG"):
            raise
        print(f"radcrypt: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

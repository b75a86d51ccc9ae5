"""The command-line front: parses, asks for passwords, shows progress, calls the facade.

Every use case goes through app.core.client (the facade the GUI calls too); this module
only turns options into calls and answers into text or JSON.

Exit codes (one table for every command; README "Exit codes"):

    0    success (also a search answer shown with --allow-incomplete, marked as such)
    1    error (one clear line on stderr, no traceback; RADCRYPT_DEBUG=1 shows one),
         including a search answer that left segments out (format 2) without
         --allow-incomplete
    2    usage: unknown command or option, missing or invalid value (e.g. ``-k 0``)
    3    partial import: some files failed, the others were imported
    10   repository not found
    12   wrong password: the identity does not unlock
    130  interrupted (Ctrl-C); finished work is kept

Global options (``--store``, ``--endpoint``, ``--bucket``, ``--data-dir``,
``--service-url``, ``--workers``, ``--password-file``, ``--password-command``, ``-v``,
``--json``) are accepted before and after the subcommand. ``--json`` output is one JSON
object with ``"schema": 1``; it never holds a password or a key (the embedded store's S3
secret key only with ``store ... --show-credentials``).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import shlex
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The helpers every topic module shares, here under their old names (app/cli_common.py).
from app.cli_common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    JSON_SCHEMA,
    _add_globals,
    _client,
    _command,
    _emit,
    _exit_code,
    _password,
    _positive_int,
    _progress,
    _secret,
    _settings,
    _usage,
)
from app.cli_common import EXIT_NOT_FOUND as EXIT_NOT_FOUND
from app.cli_common import EXIT_USAGE as EXIT_USAGE
from app.cli_common import EXIT_WRONG_PASSWORD as EXIT_WRONG_PASSWORD
from app.cli_common import _password_from_command as _password_from_command
from app.core import client as facade
from app.core import studies
from app.core.errors import RadcryptError
from app.core.progress import ProgressEvent
from app.core.settings import Settings
from app.core.similarity import similarity_word

log = logging.getLogger("radcrypt")

DEFAULT_BATCH = 64  # app.core.importer.DEFAULT_BATCH, without importing numpy for --help
MAX_K = facade.MAX_K  # the service's limit, defined once in cloud/limits.py


# --- commands ---------------------------------------------------------------------------


def cmd_store(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.action == "stop":
        stopped = facade.stop_store(settings)
        _emit(args, {"stopped": stopped},
              lambda: print("embedded store stopped" if stopped else "no embedded store running"))
        return EXIT_OK
    status = facade.store_status(settings, start=args.action == "start",
                                 credentials=args.show_credentials)

    def text() -> None:
        if status.kind == "memory":
            print("in-memory store: each command has its own, and nothing is kept")
        elif status.kind == "directory":
            print(f"directory store in {status.data_dir}: no server, nothing to start")
        elif not status.running:
            print(f"no embedded store running for {status.data_dir}")
        else:
            print(f"embedded store ({status.kind}) at {status.endpoint}, bucket "
                  f"{status.bucket}, pid {status.pid}, data in {status.data_dir}")
            if args.show_credentials:
                print(f"access key {status.access_key}\nsecret key {status.secret_key}")

    _emit(args, status.as_dict(), text)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    return facade.serve(args, _settings(args))


def cmd_check(args: argparse.Namespace) -> int:
    if args.repo:
        return _check_repository(args)
    if args.read_data or args.read_data_subset is not None:
        _usage(args, "--read-data and --read-data-subset need --repo NAME")
    results = facade.check_connection(_settings(args))
    failed = any(r.ok is False for r in results)
    _emit(args, {"ok": not failed, "checks": [r.as_dict() for r in results]},
          lambda: [print(f"{'ok' if r.ok else 'FAILED' if r.ok is False else '-':<7}"
                         f"{r.part:<9}{r.text}") for r in results])
    return EXIT_ERROR if failed else EXIT_OK


def _check_repository(args: argparse.Namespace) -> int:
    """``check --repo R``: one line per problem naming its object, then the strays and a
    summary; exit 1 when a problem was found (like restic check). ``--read-data`` reads
    every pack and original; ``--read-data-subset`` a part (its seed is printed, and on
    stderr before the check starts, so that an interrupted run can be repeated)."""
    subset = None
    if args.read_data_subset is not None:
        try:
            subset = facade.parse_read_data_subset(args.read_data_subset, args.seed)
        except ValueError as exc:
            _usage(args, str(exc))
        if subset is not None and subset.part is None:
            print(f"radcrypt: reading the data of a {subset.spec} subset, seed {subset.seed} "
                  f"(--seed {subset.seed} repeats it)", file=sys.stderr)
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        with _progress(not args.json, "checking", unit="objects") as progress:
            long = args.read_data or subset is not None
            report = client.check_repository(repo, progress=_stages(progress) if long
                                             else progress,
                                             read_data=args.read_data, subset=subset)
    _emit(args, report.as_dict(), lambda: [print(line) for line in report.lines()])
    return EXIT_OK if report.ok else EXIT_ERROR


def _stages(bar: Callable[[ProgressEvent], None]) -> Callable[[ProgressEvent], None]:
    """The bar, and one line on stderr per stage when stderr is not a terminal (a long
    check run from a script or a timer shows in its log where it is)."""
    if sys.stderr.isatty():
        return bar
    seen: set[str] = set()

    def update(event: ProgressEvent) -> None:
        if event.stage not in seen:
            seen.add(event.stage)
            print(f"radcrypt: {event.stage} ({event.total})", file=sys.stderr, flush=True)
        bar(event)

    return update


def cmd_gc(args: argparse.Namespace) -> int:
    """``gc --repo R``: delete the orphans of dead imports past the grace period (owner,
    exclusive lock); prints each object removed."""
    try:
        grace = facade.parse_duration(args.grace)
    except ValueError as exc:
        _usage(args, str(exc))
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        with _progress(not args.json, "gc", unit="objects") as progress:
            report = client.gc(repo, grace_seconds=grace, dry_run=args.dry_run,
                               progress=progress)
    _emit(args, report.as_dict(), lambda: [print(line) for line in report.lines()])
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    """``rm --repo R (IMAGE | --series S | --study S | --patient P)``: erase from bucket
    and index (owner or co-owner; app/core/erasure.py). Lists what goes and asks to type
    'erase' (``--yes`` instead; required without a terminal); ``--dry-run`` only lists."""
    given = [v for v in (args.image, args.series, args.study, args.patient) if v]
    if len(given) != 1:
        _usage(args, "give exactly one of IMAGE, --series, --study or --patient")
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        plan = client.erasure_plan(repo, image=args.image, series=args.series,
                                   study=args.study, patient=args.patient)
        if args.dry_run:
            _emit(args, {"dry_run": True, **plan.as_dict()},
                  lambda: [print(line) for line in plan.lines()])
            return EXIT_OK
        if not args.yes:
            if args.json or not sys.stdin.isatty():
                raise RadcryptError("erasure cannot be undone: confirm with --yes (see what "
                                    "goes with --dry-run first)")
            for line in plan.lines():
                print(line)
            answer = input(f"Erase these {len(plan.images)} image(s) for good? Type 'erase' "
                           "to confirm: ")
            if answer.strip() != "erase":
                print("radcrypt: nothing erased (not confirmed)", file=sys.stderr)
                return EXIT_ERROR
        with _progress(not args.json, "erasing", unit="objects") as progress:
            report = client.erase(repo, plan, progress=progress)
    _emit(args, report.as_dict(), lambda: [print(line) for line in report.lines()])
    return EXIT_OK


def cmd_hold(args: argparse.Namespace) -> int:
    """``repo hold --repo R on|off|status``: the legal hold that refuses erasure (setting
    and lifting it: owner or co-owner)."""
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        if args.state == "status":
            on = client.legal_hold(repo)
        else:
            on = args.state == "on"
            repo = client.set_legal_hold(repo, on)
    _emit(args, {"repo_id": repo.repo_id, "legal_hold": on,
                 "manifest_sequence": repo.manifest.sequence},
          lambda: print(f"repository {repo.repo_id}: legal hold {'on' if on else 'off'}"
                        + (" (erasure refused until an owner lifts it)" if on else "")))
    return EXIT_OK


def cmd_unlock(args: argparse.Namespace) -> int:
    """``unlock --repo R``: list the repository's locks and remove the stale ones (all
    with --remove-all; --list only lists)."""
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        locks = client.list_locks(repo)
        removed = [] if args.list else client.remove_locks(repo, remove_all=args.remove_all)
    gone = {lock.lock_id for lock in removed}

    def text() -> None:
        for lock in locks:
            print(("removed " if lock.lock_id in gone else "") + lock.line())
        print(f"repository {repo.repo_id}: {len(locks)} lock(s), {len(removed)} removed")

    _emit(args, {"repo_id": repo.repo_id, "locks": [lock.as_dict() for lock in locks],
                 "removed": sorted(gone)}, text)
    return EXIT_OK


def cmd_repo(args: argparse.Namespace) -> int:
    if args.action == "list":
        manifests = facade.list_repositories(_settings(args))  # needs no identity
        _emit(args, {"repositories": [facade.manifest_dict(m) for m in manifests]},
              lambda: [print(f"{m.repo_id}\t{m.extractor}\tkey v{m.key_version}\t"
                             f"{m.created}") for m in manifests])
        return EXIT_OK
    with _client(args) as client:
        repo = client.create_repository(args.name, args.extractor,
                                        bound_levels=args.bound_levels,
                                        storage_format=args.format, policy=args.policy,
                                        search=args.search)
        m = repo.manifest
        kept = ("de-identified copies (DICOM PS3.15 Annex E basic profile, modified dates, "
                "clean descriptors; no file names)" if m.policy == "research" else
                "the original files, encrypted, with every patient tag")
        _emit(args, facade.manifest_dict(m),
              lambda: print(f"created repository {m.repo_id} (extractor {m.extractor}, "
                            f"key version {m.key_version}, storage format {args.format}, "
                            f"policy {m.policy}: it stores {kept}; search mode "
                            f"{m.search})"))
    return EXIT_OK


def cmd_compact(args: argparse.Namespace) -> int:
    with _client(args) as client:
        repo = client.open_repository(args.name)
        with _progress(not args.json, "compacting", unit="groups") as progress:
            report = client.compact_repository(repo, progress=progress)
    _emit(args, report.as_dict(),
          lambda: print(f"{repo.repo_id}: {report.segments_before} -> {report.segments_after} "
                        f"segments, {report.packs_before} -> {report.packs_after} packs; "
                        f"{report.deleted} replaced objects deleted, {report.deferred} kept "
                        "15 minutes for readers (a later run deletes them)"))
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    if getattr(args, "from_pacs", None):  # a study from a DICOM node (app/cli_pacs.py)
        from app.cli_pacs import cmd_import_from_pacs

        return cmd_import_from_pacs(args)
    if not args.paths:
        _usage(args, "give files or folders to import, or --from-pacs NODE --study UID")
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        with _progress(not args.json, "importing") as progress:
            report = client.import_files(repo, args.paths, progress=progress,
                                         batch_size=args.batch_size,
                                         blackouts=args.blackout or ())

        def text() -> None:
            skipped = getattr(report, "skipped", [])
            frames = getattr(report, "frames", [])
            print(f"imported {len(report.imported)}, already present "
                  f"{len(report.already_present)}, failed {len(report.failed)}"
                  + (f", skipped {len(skipped)} (not images)" if skipped else "")
                  + f" in {report.seconds:.1f} s"
                  + (f"; {len(frames)} more frames of multi-frame files, each an image"
                     if frames else ""))
            for path, reason in getattr(report, "frames_not_indexed", []):
                print(f"  frames left out: {path}: {reason}", file=sys.stderr)
            for _, reason in report.failed:
                print(f"  failed: {reason}", file=sys.stderr)
            for path, reason in skipped[:10]:  # a CD export: DICOMDIR, viewer, autorun.inf
                print(f"  skipped: {path}: {reason}", file=sys.stderr)
            if len(skipped) > 10:
                print(f"  skipped: and {len(skipped) - 10} more (--json lists them all)",
                      file=sys.stderr)

        _emit(args, report.as_dict(), text)
    if report.failed:
        return EXIT_PARTIAL if report.imported or report.already_present else EXIT_ERROR
    return EXIT_OK


def cmd_search(args: argparse.Namespace) -> int:
    if not args.images and not args.similar_to:
        _usage(args, "give query image files, or --similar-to IMAGE_ID")
    where = [t for w in args.where or () for t in shlex.split(w)] or None
    if where is not None:
        from app.core.keyword_search import KeywordSearch

        try:
            KeywordSearch.check(where)  # a usage error before any password is asked
        except ValueError as exc:
            _usage(args, f"--where: {exc}")
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        results: list[Any] = []
        if args.images:
            with _progress(not args.json and len(args.images) > 1, "searching") as progress:
                results = client.search_files(repo, args.images, k=args.k, progress=progress,
                                              allow_incomplete=args.allow_incomplete,
                                              group=not args.no_group, where=where)
        for image_id in args.similar_to or ():
            results.append(client.search_by_image_id(
                repo, image_id, k=args.k, allow_incomplete=args.allow_incomplete,
                group=not args.no_group, where=where))
        incomplete = [r for r in results if r.complete is False]

        def text() -> None:
            if incomplete:  # the first line, so that no reader of the output can miss it
                worst = max(incomplete, key=lambda r: len(r.segments_missing))
                print(worst.completeness)
            for result in results:
                mark = "  [INCOMPLETE]" if result.complete is False else ""
                print(f"{result.query}:{mark}")
                _print_hits(result)
                server = result.stats.get("milliseconds", 0.0)
                print(f"     searched {result.stats.get('vectors', 0)} images, "
                      f"{result.stats.get('full_scored', 0)} fully scored, "
                      f"engine {server:.2f} ms")

        if results and all(r.complete is None for r in results):  # once per search
            print(f"radcrypt: note: {results[0].completeness}", file=sys.stderr)
        _emit(args, {"queries": [r.as_dict() for r in results]}, text)
    return EXIT_OK


def _print_hits(result: Any) -> None:
    """One search answer: grouped (a line per series: its best image, how many more of the
    series the answer holds) or, with --no-group, every hit."""
    rows = ([(g.rank, g.best, g.more) for g in result.groups] if result.grouped
            else [(h.rank, h, 0) for h in result.hits])
    for rank, hit, more in rows:
        print(f"  {rank:>3}. {hit.name}  {similarity_word(hit.distance)} "
              f"(distance {hit.distance:.6g})  id {hit.image_id}")
        meta = hit.image
        where = [studies.patient_display(meta.attribute("PatientName")),
                 meta.modality or meta.source_format.upper(),
                 studies.date_display(meta.attribute("StudyDate"))]
        if number := meta.attribute("SeriesNumber"):
            where.append(f"series {number}")
        where += [meta.attribute("SeriesDescription"), studies.instance_label(meta)]
        if more:
            where.append(f"{more} more from this series")
        if line := " · ".join(w for w in where if w):
            print(f"       {line}")


def cmd_get(args: argparse.Namespace) -> int:
    to_stdout = args.output == "-"
    with _client(args) as client:
        client.access_purpose = args.purpose or ""
        repo = client.open_repository(args.repo)
        with _progress(True, "downloading", unit="bytes") as progress:
            if to_stdout:
                size = client.write_original(repo, args.image_id, sys.stdout.buffer,
                                             progress=progress)
            else:
                size = client.get_original(repo, args.image_id, Path(args.output),
                                           progress=progress)
        from app import cli_fhir  # get --fhir FILE (issue 18)

        fhir = cli_fhir.after_get(args, client, repo)
    where = "standard output" if to_stdout else args.output
    if args.json and not to_stdout:
        _emit(args, {"image_id": args.image_id, "path": args.output, "size": size,
                     "verified": True, **({"fhir": str(fhir)} if fhir else {})},
              lambda: None)
    else:
        print(f"wrote {where} ({size} bytes, integrity verified)", file=sys.stderr)
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        images = client.list_images(repo)
    damaged = [m for m in images if m.error]
    if args.studies or args.series is not None or args.images is not None:
        grouped = studies.group_studies(images)
        for m in damaged:  # left out of the grouping: named, never silently dropped
            print(f"radcrypt: image {m.image_id} is damaged and not listed: {m.error}",
                  file=sys.stderr)
        if args.studies:
            _ls_studies(args, repo.repo_id, grouped)
        elif args.series is not None:
            _ls_series(args, repo.repo_id, grouped)
        else:
            _ls_images(args, repo.repo_id, grouped)
        return EXIT_ERROR if damaged else EXIT_OK
    images.sort(key=lambda m: (m.imported_at, m.name, m.image_id))

    def text() -> None:
        for m in images:
            if m.error:
                print(f"{m.image_id}  (damaged: {m.error})")
            else:
                print(f"{m.image_id}  {m.imported_at.replace('T', ' ')[:19]:<19}  "
                      f"{m.modality or '-':<4}  {m.name}")

    _emit(args, {"repository": repo.repo_id,
                 "images": [{"image_id": m.image_id, "name": m.name,
                             "imported_at": m.imported_at, "modality": m.modality,
                             "size": m.size, "source_format": m.source_format,
                             **({"error": m.error} if m.error else {})} for m in images]},
          text)
    return EXIT_ERROR if any(m.error for m in images) else EXIT_OK


def _table(header: list[str], rows: list[list[str]], right: frozenset[int] = frozenset(),
           widest: int = 40) -> None:
    """Aligned columns; a cell longer than ``widest`` is cut with an ellipsis (the JSON
    output has every value whole); the last column (an id or UID) is never cut."""
    cells = [[c if i == len(header) - 1 or len(c) <= widest else c[: widest - 1] + "…"
              for i, c in enumerate(row)] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.rjust(w) if i in right else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())


def _study_dict(row: int, study: studies.Study) -> dict[str, Any]:
    return {"row": row, "key": study.key,
            "study_uid": "" if study.key.startswith(studies.LONE_PREFIX) else study.key,
            "patient_name": study.patient_name, "patient_id": study.patient_id,
            "study_date": study.study_date, "study_time": study.study_time,
            "accession": study.accession, "description": study.description,
            "modalities": list(study.modalities), "series_count": len(study.series),
            "image_count": study.image_count}


def _series_dict(row: str, series: studies.Series) -> dict[str, Any]:
    return {"row": row, "key": series.key,
            "series_uid": "" if series.key.startswith(studies.LONE_PREFIX) else series.key,
            "study_key": series.study_key, "modality": series.modality,
            "number": series.number, "description": series.description,
            "body_part": series.body_part, "image_count": len(series.images),
            "thumbnail": series.thumbnail.image_id}


def _ls_studies(args: argparse.Namespace, repo_id: str, grouped: list[studies.Study]
                ) -> None:
    def text() -> None:
        _table(["#", "Patient", "Patient ID", "Date", "Modality", "Description", "Series",
                "Images", "Study UID"],
               [[str(i), studies.patient_display(s.patient_name) or "-",
                 s.patient_id or "-", studies.date_display(s.study_date) or "-",
                 "/".join(s.modalities) or "-", s.description or "-", str(len(s.series)),
                 str(s.image_count), s.key] for i, s in enumerate(grouped, 1)],
               right=frozenset({0, 6, 7}))

    _emit(args, {"repository": repo_id,
                 "studies": [_study_dict(i, s) for i, s in enumerate(grouped, 1)]}, text)


def _ls_series(args: argparse.Namespace, repo_id: str, grouped: list[studies.Study]
               ) -> None:
    study = studies.find_study(grouped, args.series)
    row = grouped.index(study) + 1

    def text() -> None:
        print(f"Study {row}: {studies.patient_display(study.patient_name) or '-'}"
              f" ({study.patient_id or 'no patient id'}) · "
              f"{studies.date_display(study.study_date) or 'no date'} · "
              f"{study.description or 'no description'}")
        _table(["#", "Series", "Modality", "Body part", "Description", "Images",
                "Series UID"],
               [[f"{row}.{i}", s.number or "-", s.modality or "-", s.body_part or "-",
                 s.description or "-", str(len(s.images)), s.key]
                for i, s in enumerate(study.series, 1)], right=frozenset({5}))

    _emit(args, {"repository": repo_id, "study": _study_dict(row, study),
                 "series": [_series_dict(f"{row}.{i}", s)
                            for i, s in enumerate(study.series, 1)]}, text)


def _ls_images(args: argparse.Namespace, repo_id: str, grouped: list[studies.Study]
               ) -> None:
    series = studies.find_series(grouped, args.images)
    label = next(lab for lab, s in studies.series_rows(grouped) if s is series)
    study = next(s for s in grouped if s.key == series.study_key)

    def position(meta: facade.ImageMeta) -> str:
        value = studies.slice_position(meta)
        return f"{value:.2f}" if value != float("inf") else "-"

    def text() -> None:
        print(f"Series {label}: {studies.series_label(series)} · "
              f"{studies.patient_display(study.patient_name) or '-'} · "
              f"{studies.date_display(study.study_date) or 'no date'}")
        _table(["#", "Instance", "Frame", "Position (mm)", "Name", "Image id"],
               [[str(i), m.attribute("InstanceNumber") or "-",
                 f"{m.frame + 1}/{m.frames}" if m.frames > 1 else "-", position(m), m.name,
                 m.image_id] for i, m in enumerate(series.images, 1)], right=frozenset({0, 1, 3}))

    _emit(args, {"repository": repo_id, "series": _series_dict(label, series),
                 "images": [{"row": i, "image_id": m.image_id, "name": m.name,
                             "instance": m.attribute("InstanceNumber"), "frame": m.frame,
                             "frames": m.frames, "sop_uid": m.sop_uid,
                             "original_id": m.original_image_id,
                             "slice_position": (None if (p := studies.slice_position(m))
                                                == float("inf") else p)}
                            for i, m in enumerate(series.images, 1)]}, text)


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        meta = client.image_meta(repo, args.image_id)

    def text() -> None:
        print(f"# {meta.name}  ({meta.image_id})")
        print(f"# imported {meta.imported_at}, {meta.size} bytes, "
              f"{meta.source_format or 'unknown format'}, {meta.columns} x {meta.rows}, "
              f"sha256 {meta.sha256}, key version {meta.key_version}")
        if meta.frames > 1:
            print(f"# frame {meta.frame + 1} of {meta.frames}; the original is stored with "
                  f"image {meta.original_image_id}")
        # the clinical attributes too; a keyword in both shows the tag, as before
        values = {**meta.clinical, **meta.tags}
        width = max((len(k) for k in values), default=0)
        for keyword in sorted(values):
            print(f"{keyword:<{width}}  {values[keyword]}")
        if args.features:
            print(f"features ({meta.extractor}): "
                  + " ".join(f"{x:.5g}" for x in meta.features))

    _emit(args, meta.as_dict(features=args.features), text)
    return EXIT_OK


def _passphrase(args: argparse.Namespace, confirm: bool) -> str:
    """The identity backup passphrase: --passphrase-file, else RADCRYPT_BACKUP_PASSPHRASE,
    else asked (twice when ``confirm``). Never the login password (the core refuses it)."""
    return _secret(file=args.passphrase_file, env="RADCRYPT_BACKUP_PASSPHRASE",
                   prompt="Backup passphrase: ", confirm=confirm, kind="passphrase",
                   name="backup passphrase",
                   sources="--passphrase-file, RADCRYPT_BACKUP_PASSPHRASE")


def _identity_backup(args: argparse.Namespace, settings: Settings) -> int:
    """identity export --secret --out FILE, and identity restore FILE."""
    if args.action == "restore":
        if not args.file:
            _usage(args, "identity restore needs the backup FILE")
        passphrase = _passphrase(args, confirm=False)
        password = _password(args, confirm=True, prompt="New login password: ")
        identity = facade.restore_identity_backup(settings, args.file, passphrase, password)
        print(f"restored identity {identity.user_id} into {settings.data_path}; "
              f"fingerprint {identity.card().fingerprint}", file=sys.stderr)
        return EXIT_OK
    if not args.output:
        _usage(args, "identity export --secret needs --out FILE")
    password = _password(args, prompt="Login password: ")
    passphrase = _passphrase(args, confirm=True)
    identity = facade.export_identity_backup(settings, password, passphrase, args.output)
    _emit(args, {"user_id": identity.user_id, "backup": str(args.output)},
          lambda: print(f"wrote the identity backup of {identity.user_id} to {args.output}; "
                        "keep it and its passphrase apart, off this workstation"))
    return EXIT_OK


def cmd_identity(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.action == "restore" or (args.action == "export" and args.secret):
        return _identity_backup(args, settings)
    if args.action == "create":
        if not args.name:
            _usage(args, "identity create needs --name")
        password = _password(args, confirm=True, prompt="New password: ")
        words = facade.check_new_password(password, args.name)  # zxcvbn >= 3, or why not
        identity = facade.create_identity(settings, args.name, password)
        print(f"created identity {identity.user_id} (password {words}); "
              f"fingerprint {identity.card().fingerprint}", file=sys.stderr)
    elif args.action == "passwd":
        old = _password(args, prompt="Current password: ")
        if not args.new_password_file and not sys.stdin.isatty():
            _usage(args, "identity passwd needs --new-password-file (or a terminal)")
        if args.new_password_file:
            try:
                new = Path(args.new_password_file).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise RadcryptError(f"cannot read new password file {args.new_password_file}: "
                                    f"{exc.strerror}") from None
        else:
            new = getpass.getpass("New password: ")
            if getpass.getpass("Again: ") != new:
                raise RadcryptError("the two passwords differ")
        identity = facade.change_identity_password(settings, old, new)
        print(f"the identity {identity.user_id} is now encrypted under the new password",
              file=sys.stderr)
    card = facade.public_card(settings)
    if args.action == "export":
        if args.output:
            Path(args.output).write_text(card.to_json(), encoding="utf-8")
            print(f"wrote your public card to {args.output}; give it to the data owner",
                  file=sys.stderr)
        else:
            print(card.to_json())
        return EXIT_OK
    info = {"user_id": card.user_id, "name": card.name, "fingerprint": card.fingerprint,
            "identity_file": str(facade.identity_file(settings))}
    _emit(args, info, lambda: print(f"{card.name} ({card.user_id}), fingerprint "
                                    f"{card.fingerprint}"))
    return EXIT_OK


def cmd_user(args: argparse.Namespace) -> int:
    try:
        text = Path(args.card).read_text(encoding="utf-8")
    except OSError as exc:
        raise RadcryptError(f"cannot read card {args.card}: {exc.strerror}") from None
    with _client(args) as client:
        record = client.register_user(text)
    _emit(args, {"user_id": record.user_id, "name": record.name,
                 "fingerprint": record.fingerprint},
          lambda: print(f"registered {record.name} ({record.user_id}), fingerprint "
                        f"{record.fingerprint}"))
    return EXIT_OK


def cmd_access(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "migrate" and args.format == 2:
            with _progress(not args.json, "migrating", unit="groups") as progress:
                report = client.migrate_to_format2(args.name, progress=progress)
            _emit(args, report.as_dict(),
                  lambda: print(f"repository {args.name} is in storage format 2: "
                                f"{report.images} images moved now, {report.deleted} "
                                "format-1 objects deleted"
                                + (f"; {len(report.skipped)} images left out (metadata or "
                                   "preview missing or damaged)" if report.skipped else "")))
            return EXIT_OK
        if args.action == "migrate":
            old = os.environ.get("RADCRYPT_OLD_PASSWORD")
            if args.old_password_file:
                old = Path(args.old_password_file).read_text(encoding="utf-8").rstrip("\r\n")
            # a password repository needs its old password (--old-password-file or
            # RADCRYPT_OLD_PASSWORD); an owner-signed one without members needs none
            repo = client.migrate_repository(args.name, old or None)
            members = [m.user_id for m in repo.manifest.members]
            _emit(args, {"repo_id": repo.repo_id, "owner": client.user_id,
                         "members": members},
                  lambda: print(f"repository {repo.repo_id} now belongs to {client.user_id} "
                                f"(members: {', '.join(members)})"))
            return EXIT_OK
        repo = client.open_repository(args.name)
        if args.action == "grant":
            client.grant(repo, args.user)
            _emit(args, {"repo_id": repo.repo_id, "granted": args.user,
                         "key_version": repo.manifest.key_version},
                  lambda: print(f"granted {args.user} access to {repo.repo_id} "
                                f"(key version {repo.manifest.key_version})"))
            return EXIT_OK
        if args.action == "add-owner":
            repo = client.add_owner(repo, args.user)
            owners = [repo.manifest.owner, *(c.user_id for c in repo.manifest.co_owners)]
            _emit(args, {"repo_id": repo.repo_id, "owners": owners},
                  lambda: print(f"{args.user} is now a co-owner of {repo.repo_id} "
                                f"(owners: {', '.join(owners)})"))
            return EXIT_OK
        if args.action == "revoke":
            with _progress(not args.json, "re-encrypting", unit="images") as progress:
                repo = client.revoke(repo, args.user, progress=progress)
            _emit(args, {"repo_id": repo.repo_id, "revoked": args.user,
                         "key_version": repo.manifest.key_version},
                  lambda: print(f"revoked {args.user}; {repo.repo_id} is now at key version "
                                f"{repo.manifest.key_version}"))
            return EXIT_OK
        entries = client.access_list(repo)
        _emit(args, {"repo_id": repo.repo_id,
                     "members": [{"user_id": e.user_id, "name": e.name,
                                  "key_version": e.key_version, "status": e.status}
                                 for e in entries],
                     "ignored": list(entries.ignored)},
              lambda: [print(f"{e.user_id}\t{e.name}\tkey v{e.key_version}"
                             + ("" if e.status == "ok" else f"\t({e.status})"))
                       for e in entries])
        if entries.ignored and not args.json:
            print(f"ignored under grants/ (not members, or not signed by the owner): "
                  f"{', '.join(map(repr, entries.ignored))}", file=sys.stderr)
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    if args.access:
        return _audit_access(args)
    if args.csv or args.output:
        _usage(args, "--csv and --output go with --access")
    with _client(args) as client:
        entries = client.audit(client.open_repository(args.repo))
    _emit(args, {"entries": entries},
          lambda: [print(f"{e.get('time')}  {e.get('user')}  {e.get('action')}"
                         f"  results={e.get('results')}  {e.get('duration_ms')} ms")
                   for e in entries])
    return EXIT_OK


def _audit_access(args: argparse.Namespace) -> int:
    """``audit --access``: the access log (who decrypted which original or preview),
    every chain verified; as a table, CSV or JSON (to --output or standard output).
    Entries that do not verify are left out and named on stderr: exit status 1."""
    with _client(args) as client:
        report = client.access_log(client.open_repository(args.repo))
    if args.csv:
        text = report.to_csv()
    elif args.json:
        text = json.dumps({"schema": JSON_SCHEMA, **report.as_dict()}, indent=2) + "\n"
    else:
        text = "".join(f"{e.time}  {e.user_id}  {e.action:8}  {e.image_id}  "
                       f"study {e.study_uid or '-'}  {e.purpose}\n" for e in report.events)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {len(report.events)} access events to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    for user_id, count in report.unreadable.items():
        print(f"radcrypt: {count} entries of {user_id} are not addressed to you (written "
              "before you became a co-owner)", file=sys.stderr)
    for problem in report.problems:
        print(f"radcrypt: {problem}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_features(args: argparse.Namespace) -> int:
    vectors = facade.local_features(args.images, args.extractor)
    rows = [{"path": p, "vector": [float(x) for x in v]}
            for p, v in zip(args.images, vectors, strict=True)]
    _emit(args, {"extractor": args.extractor, "features": rows},
          lambda: [print(r["path"], " ".join(f"{x:.5g}" for x in r["vector"])) for r in rows])
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    settings = _settings(args)
    to_stdout = args.json is True or args.json == "-"
    with tempfile.TemporaryDirectory(prefix="radcrypt-demo-") as tmp:
        work = Path(tmp)
        if not args.data_dir:  # a throw-away store unless the user chose one
            settings = settings.with_overrides(data_dir=str(work / "data"),
                                               store=args.store or "embedded", service_url="")
        where = {"embedded": "embedded S3 store (SeaweedFS)", "s3": "S3 store",
                 "directory": "directory store",
                 "memory": "in-memory store (nothing is kept)"}.get(settings.store, "store")
        print(f"Radcrypt demo: {where}, search service, fresh repository, "
              f"{args.images} sample images, {args.queries} perturbed queries", file=sys.stderr)
        with _progress(True, "importing") as progress:
            report = facade.run_demo(settings, work, count=args.images, queries=args.queries,
                                     progress=progress)
    data = {"schema": JSON_SCHEMA, **report.as_dict()}
    if to_stdout:
        print(json.dumps(data, indent=2))
    else:
        frames = (f"; {report.archive_images} searchable, every frame of the multi-frame "
                  "files counted" if report.archive_images > report.images else "")
        print(f"imported {report.images} images in {report.import_seconds:.1f} s{frames}")
        print(f"{'query':<34} {'expected':<28} {'returned':<28} {'distance':>10} {'ms':>8}  ok")
        for row in report.rows:
            print(f"{row.query[:34]:<34} {row.expected[:28]:<28} {row.returned[:28]:<28} "
                  f"{row.distance:10.4g} {row.milliseconds:8.1f}  "
                  f"{'yes' if row.matched else 'NO'}")
        matched = sum(r.matched for r in report.rows)
        print(f"matched {matched}/{len(report.rows)}; agreement with plaintext search over "
              f"the same features: {report.agreement:.3f}")
    if isinstance(args.json, str) and args.json != "-":
        Path(args.json).write_text(json.dumps(data, indent=2))
    return EXIT_OK if report.all_matched and report.agreement == 1.0 else EXIT_ERROR


# --- parser -----------------------------------------------------------------------------


def _blackout(text: str) -> Any:
    try:
        return facade.parse_blackout(text)
    except RadcryptError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _k(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_K:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_K}, not {value}")
    return value


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "unknown"
    try:
        return version("radcrypt")
    except PackageNotFoundError:
        return "unknown (not installed)"


EPILOG = ("exit codes: 0 ok, 1 error, 2 usage, 3 partial import, 10 repository not found, "
          "12 wrong password, 130 interrupted")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radcrypt", description="Encrypted image archive "
                                     "search: the cloud stores and matches only ciphertext.",
                                     epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"radcrypt {_version()}",
                        help="print the version and exit")
    _add_globals(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "store", "start, stop or show the embedded S3 store", cmd_store)
    p.add_argument("action", choices=["start", "stop", "status"], help="what to do")
    p.add_argument("--show-credentials", action="store_true",
                   help="also print the S3 secret key (never printed otherwise)")

    p = _command(sub, "serve", "run the search service", cmd_serve, json_flag=False)
    facade.add_service_arguments(p)

    p = _command(sub, "check", "test the connection: storage, bucket, search service; with "
                 "--repo, check a repository instead", cmd_check)
    p.add_argument("--repo", metavar="NAME",
                   help="check this repository: manifest, segment log, segments, packs, "
                        "labels, images and stray objects; exit status 1 when a problem "
                        "is found")
    p.add_argument("--read-data", action="store_true",
                   help="with --repo: also read every pack whole and decrypt every "
                        "original (reads the whole repository; one access-log entry, "
                        "'integrity check', names every image decrypted)")
    p.add_argument("--read-data-subset", metavar="SUBSET",
                   help="with --repo: read only a part: a percentage (10%%, a random choice "
                        "whose seed is printed) or n/m (the n-th of m parts; m runs read "
                        "everything)")
    p.add_argument("--seed", type=int, default=None,
                   help="the seed of a percentage --read-data-subset (repeats a run)")

    p = _command(sub, "gc", "remove the orphans of dead imports and label changes (objects "
                 "no log entry names) older than the grace period; owner only", cmd_gc)
    p.add_argument("--repo", required=True, metavar="NAME", help="repository name")
    p.add_argument("--grace", default="24h", metavar="DURATION",
                   help="keep orphans younger than this (default 24h; 30m, 90s, 2d, or "
                        "seconds)")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be removed, remove nothing")

    p = _command(sub, "rm", "erase an image (every frame of its file), a series, a study "
                 "or a patient from bucket and index, for good (owner; refused under a "
                 "legal hold)", cmd_rm)
    p.add_argument("--repo", required=True, metavar="NAME", help="repository name")
    p.add_argument("image", nargs="?", metavar="IMAGE", help="an image id (or a unique "
                   "prefix of one)")
    p.add_argument("--series", metavar="SERIES", help="a SeriesInstanceUID (or a unique "
                   "prefix), as `ls` shows it")
    p.add_argument("--study", metavar="STUDY", help="a StudyInstanceUID (or a unique prefix)")
    p.add_argument("--patient", metavar="PATIENT", help="a PatientID (PatientName when no "
                   "image has that id)")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be erased, erase nothing")
    p.add_argument("--yes", action="store_true",
                   help="do not ask for confirmation (needed without a terminal)")

    p = _command(sub, "unlock", "list a repository's locks and remove the stale ones "
                 "(processes gone, or not refreshed for 30 minutes)", cmd_unlock)
    p.add_argument("--repo", required=True, metavar="NAME", help="repository name")
    p.add_argument("--remove-all", action="store_true",
                   help="remove every lock, fresh ones too (only when you know their "
                        "processes are gone)")
    p.add_argument("--list", action="store_true", help="only list the locks")

    p = _command(sub, "repo", "create, list and share repositories", cmd_repo)
    repo_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = _command(repo_sub, "create", "a new repository owned by your identity (new keys)",
                 cmd_repo)
    c.add_argument("name", help="repository name (lower case letters, digits, -)")
    c.add_argument("--extractor", default="radcrypt-v1",
                   help="feature extractor (default radcrypt-v1)")
    c.add_argument("--bound-levels", choices=("auto", "off"), default="auto",
                   help="off: no bound levels (searches scan every full vector, slower; a "
                        "known-plaintext attacker then needs d + 1 known images, see "
                        "SECURITY.md)")
    c.add_argument("--policy", choices=("clinical", "research"), default="clinical",
                   help="clinical (default): the original files are stored, encrypted, with "
                        "every patient tag; research: de-identified copies only (PS3.15 "
                        "Annex E basic profile with modified dates and clean descriptors, "
                        "pseudonyms from the repository's key, no file names)")
    c.add_argument("--search", choices=("sknn", "workstation", "ckks"), default="sknn",
                   help="sknn (default): the search service ranks secure-kNN ciphertexts "
                        "(fast; weak against a known-plaintext attacker, see SECURITY.md); "
                        "workstation: no ciphertexts on the server, each member's client "
                        "keeps an encrypted local copy of the feature arrays and searches "
                        "it here (the server learns nothing of queries); ckks: the service "
                        "computes encrypted scores under homomorphic encryption, decrypted "
                        "and re-scored exactly here (the server learns nothing of queries, "
                        "scores or ranking; slower, about 0.3 s at 10,000 images)")
    c.add_argument("--format", type=int, choices=(2,), default=2,
                   help="storage format: 2, the only one for new repositories (packs and a "
                        "signed segment log; search answers are checked for completeness; "
                        "docs/FORMAT-2.md); format 1 is read-only: `repo migrate "
                        "--format 2` moves an old repository")
    _command(repo_sub, "list", "list the repositories in the store", cmd_repo)
    for action, words in (("grant", "give a registered user access"),
                          ("revoke", "remove a user's access (rotates the keys)")):
        c = _command(repo_sub, action, words, cmd_access)
        c.add_argument("name", help="repository name")
        c.add_argument("user", help="the user's id (from their public card)")
    c = _command(repo_sub, "add-owner", "make a member a co-owner (owner only): any owner "
                 "can then grant, revoke and sign for the repository", cmd_access)
    c.add_argument("name", help="repository name")
    c.add_argument("user", help="the member's user id")
    c = _command(repo_sub, "access", "who has access", cmd_access)
    c.add_argument("name", help="repository name")
    c = _command(repo_sub, "migrate", "give an old repository (password-locked, or signed "
                 "without members) an owner-signed membership list; with --format 2, move "
                 "it to storage format 2", cmd_access)
    c.add_argument("name", help="repository name")
    c.add_argument("--old-password-file", metavar="FILE",
                   help="the old repository password (or RADCRYPT_OLD_PASSWORD)")
    c.add_argument("--format", type=int, choices=(2,), default=None,
                   help="2: move the repository to storage format 2 (packs, segment log; "
                        "owner only; after a failure, run it again to finish)")
    c = _command(repo_sub, "compact", "merge a format-2 repository's small segments and "
                 "packs (any member)", cmd_compact)
    c.add_argument("name", help="repository name")
    c = _command(repo_sub, "hold", "set, lift or show the legal hold, which refuses "
                 "erasure (radcrypt rm) until an owner lifts it", cmd_hold)
    c.add_argument("--repo", required=True, metavar="NAME", help="repository name")
    c.add_argument("state", choices=("on", "off", "status"), help="on, off or status")

    p = _command(sub, "identity", "your identity on this workstation", cmd_identity)
    p.add_argument("action", choices=["create", "show", "export", "passwd", "restore"],
                   help="create a new one, show it, export the public card (with --secret: "
                        "a backup of the private keys), change its password, or restore a "
                        "backup into a new data directory")
    p.add_argument("file", nargs="?", metavar="FILE",
                   help="the identity backup to restore (restore)")
    p.add_argument("--name", help="your name (create)")
    p.add_argument("-o", "--output", "--out", metavar="FILE", help="write the public card "
                   "here (export; default: standard output), or the backup (export --secret)")
    p.add_argument("--secret", action="store_true",
                   help="export the private keys, encrypted under a separate backup "
                        "passphrase (never the login password), to --out FILE")
    p.add_argument("--passphrase-file", metavar="FILE",
                   help="read the backup passphrase from this file (export --secret, "
                        "restore; or RADCRYPT_BACKUP_PASSPHRASE; default: ask)")
    p.add_argument("--new-password-file", metavar="FILE",
                   help="read the new password from this file (passwd; default: ask)")

    p = _command(sub, "user", "users of your repositories", cmd_user)
    user_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = _command(user_sub, "register", "register a user's public card", cmd_user)
    c.add_argument("card", help="the card file the user exported")

    p = _command(sub, "audit", "the search service's audit trail of a repository", cmd_audit)
    p.add_argument("--repo", required=True, help="repository name")
    p.add_argument("--access", action="store_true",
                   help="the access log instead: who decrypted which original or preview, "
                        "when, and why (owners only; forged, reordered or deleted entries "
                        "are named and exit status is 1)")
    p.add_argument("--csv", action="store_true", help="with --access: CSV, one row per event")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="with --access: write the table, CSV or JSON to FILE")

    p = _command(sub, "import", "import files or folders (recursive)", cmd_import)
    p.add_argument("--repo", required=True, help="repository name")
    p.add_argument("paths", nargs="*", help="files or folders")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH, metavar="N",
                   help=f"images per index segment, the unit of commit and resume "
                        f"(default {DEFAULT_BATCH})")
    p.add_argument("--blackout", action="append", type=_blackout, metavar="X,Y,W,H",
                   help="research repositories: a rectangle (pixels from the top left) "
                        "painted over every image before de-identification; repeatable. "
                        "Images that may carry burned-in text (BurnedInAnnotation YES, or "
                        "US/SC/OT without it) are refused without one")

    p = _command(sub, "search", "nearest archived images of query images", cmd_search)
    p.add_argument("--repo", required=True, help="repository name")
    p.add_argument("images", nargs="*", help="query image files")
    p.add_argument("--similar-to", action="append", metavar="IMAGE_ID",
                   help="also search with an archived image's stored features (no file "
                        "needed; the image itself is left out of its answer); repeatable")
    p.add_argument("-k", type=_k, default=1, help=f"results per query, 1 to {MAX_K} "
                                                  "(default 1)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="show the hits of an answer that left segments of the repository "
                        "out (format 2), marked INCOMPLETE, instead of failing with exit "
                        "status 1")
    p.add_argument("--no-group", action="store_true",
                   help="list every hit; by default hits of one series collapse into one "
                        "line (its best image, 'N more from this series') and the k lines "
                        "name k different series where the archive has them")
    p.add_argument("--where", action="append", metavar="TERMS",
                   help="only among images matching these keywords (as for 'radcrypt "
                        "find', e.g. --where 'modality=MR bodypart=KNEE'); repeatable, ANDed")

    from app import cli_keywords

    cli_keywords.register(sub, _command)  # find, label (issue 17)

    p = _command(sub, "get", "download, verify and decrypt an original", cmd_get)
    p.add_argument("--repo", required=True, help="repository name")
    p.add_argument("image_id", help="the image id (from search or ls)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="where to write it; - for standard output")
    p.add_argument("--purpose", metavar="TEXT",
                   help="why you open it (e.g. 'tumour board'): kept in the repository's "
                        "access log with your name, the time and the image")
    from app import cli_fhir  # get --fhir FILE, and `radcrypt fhir` (issue 18)

    cli_fhir.add_get_options(p)
    cli_fhir.register(sub, _command)

    p = _command(sub, "ls", "list the images, studies or series of a repository", cmd_ls)
    p.add_argument("--repo", required=True, help="repository name")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--studies", action="store_true",
                       help="one row per study: patient, date, modality, description, "
                            "series and image counts")
    level.add_argument("--series", metavar="STUDY",
                       help="the series of one study: its Study Instance UID, a unique "
                            "prefix of it, or its row number in 'ls --studies'")
    level.add_argument("--images", metavar="SERIES",
                       help="the images of one series in stack order: its Series Instance "
                            "UID, a unique prefix, or its row label S.N from 'ls --series'")

    p = _command(sub, "show", "the decrypted tags of one image, like dcmdump", cmd_show)
    p.add_argument("--repo", required=True, help="repository name")
    p.add_argument("image_id", help="the image id (from search or ls)")
    p.add_argument("--features", action="store_true", help="also print the feature vector")

    p = _command(sub, "features", "plaintext features of local images", cmd_features)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--extractor", default="radcrypt-v1",
                   help="feature extractor (default radcrypt-v1)")

    p = _command(sub, "demo", "end-to-end demonstration on sample images", cmd_demo,
                 json_flag=False)
    p.add_argument("--json", nargs="?", const=True, default=argparse.SUPPRESS,
                   metavar="FILE", help="the report as JSON (schema 1): on standard "
                   "output, or written to FILE")
    p.add_argument("--images", type=_positive_int, default=300,
                   help="sample images to import (default 300)")
    p.add_argument("--queries", type=_positive_int, default=20,
                   help="perturbed queries (default 20)")

    from app import cli_pacs  # receive, send, pacs ...; import --from-pacs (issue 18)

    cli_pacs.register(sub, _command)
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
    # SIGTERM/SIGHUP (shutdown, logout) unwind like Ctrl+C does: the session's embedded
    # store and search service are stopped, a demo's temporary folder removed.
    facade.exit_on_termination_signals()
    try:
        return func(args)
    except KeyboardInterrupt:
        print("radcrypt: interrupted; finished work is kept, run the command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except facade.expected_errors() as exc:
        if os.environ.get("RADCRYPT_DEBUG"):
            raise
        print(f"radcrypt: {exc}", file=sys.stderr)
        return _exit_code(exc)
    except Exception as exc:  # the one line promised, whatever failed
        if os.environ.get("RADCRYPT_DEBUG"):
            raise
        print(f"radcrypt: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())

"""Keyword search on the command line (issue 17): ``radcrypt find``, ``radcrypt label``.

    radcrypt find --repo R modality=CT bodypart=CHEST [date=2024-01..2024-06] [--json]
    radcrypt label add --repo R IMAGE_ID [IMAGE_ID ...] WORD
    radcrypt label rm  --repo R IMAGE_ID [IMAGE_ID ...] WORD
    radcrypt label ls  --repo R IMAGE_ID

(``radcrypt search --where TERMS`` filters an image search: app/cli.py.) Why a module of
its own: app/cli.py stays one file per topic's registration (``register``); the shared
helpers (``_client``, ``_emit``, ``_usage``) come from app/cli_common.py (app.cli imports
this module, so it cannot import app.cli back). A query the parser refuses is a usage error
(exit 2) naming the term; an answer that left segments out fails (exit 1) unless
--allow-incomplete, as for search.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from app.cli_common import EXIT_OK, _client, _emit, _usage

TERMS_HELP = ("keyword terms, ANDed across fields, ORed within one: field=v1,v2; "
              "NOT field=v or field!=v (or -field=v after --); date=2024, "
              "date=2024-01..2024-06. Fields: modality, bodypart, laterality, study, series, "
              "patient, accession, date, label")


def register(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``find`` and ``label`` to the subcommands (``command`` is
    app.cli_common's ``_command``)."""
    p = command(sub, "find", "images matching keywords, searched encrypted: the service "
                "sees tokens, never a keyword", cmd_find)
    p.add_argument("--repo", required=True, help="repository name")
    p.add_argument("terms", nargs="+", metavar="TERM", help=TERMS_HELP)
    p.add_argument("--images", action="store_true",
                   help="list every image found; by default one line per study")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="show what an answer that left segments out found, marked "
                        "INCOMPLETE, instead of failing with exit status 1")

    p = command(sub, "label", "add, remove or list the labels of images (searchable as "
                "label=WORD)", cmd_label_help, json_flag=False)
    label_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, words in (("add", "label images with a word"),
                          ("rm", "take a label off images (a tombstone)")):
        c = command(label_sub, action, words, cmd_label)
        c.add_argument("--repo", required=True, help="repository name")
        c.add_argument("image_ids", nargs="+", metavar="IMAGE_ID", help="the images")
        c.add_argument("word", help="the label: a word (two letters or digits or more); a "
                       "phrase labels each of its words")
    c = command(label_sub, "ls", "the labels of an image", cmd_label)
    c.add_argument("--repo", required=True, help="repository name")
    c.add_argument("image_ids", nargs=1, metavar="IMAGE_ID", help="the image")


def cmd_label_help(args: argparse.Namespace) -> int:  # pragma: no cover - argparse requires
    args.parser.print_help()
    return 2


def cmd_find(args: argparse.Namespace) -> int:
    from app.core.keyword_search import KeywordSearch

    try:
        KeywordSearch.check(args.terms)  # a usage error before any password is asked
    except ValueError as exc:
        _usage(args, str(exc))
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        result = client.keywords.find(repo, args.terms,
                                      allow_incomplete=args.allow_incomplete)

    def text() -> None:
        if result.complete is False:
            print(f"INCOMPLETE ANSWER: {len(result.segments_missing):,} of "
                  f"{result.segments_expected:,} segments were not searched")
        shown = (f"{len(result.images)} of {result.matched} (narrow the query to see the "
                 "others)" if result.truncated else f"{len(result.images)}")
        print(f"{result.query}: {shown} images in {len(result.studies)} studies")
        if args.images:
            for meta in result.images:
                parts = [meta.attribute("Modality"), meta.attribute("BodyPartExamined"),
                         _date(meta.attribute("StudyDate")), meta.attribute(
                             "SeriesDescription")]
                print(f"  {meta.image_id}  {meta.name}  "
                      + " · ".join(p for p in parts if p))
            return
        for study in result.studies:
            parts = [_date(study.study_date), "/".join(study.modalities), study.description,
                     f"accession {study.accession}" if study.accession else "",
                     f"{len(study.series)} series, {study.image_count} images"]
            print(f"  {study.patient_id or '-'}  " + " · ".join(p for p in parts if p))
            print(f"       study {study.key}")

    if result.complete is None:
        print("radcrypt: note: completeness not verifiable (format 1)", file=sys.stderr)
    _emit(args, result.as_dict(), text)
    return EXIT_OK


def _date(da: str) -> str:
    from app.core import studies

    return studies.date_display(da)


def cmd_label(args: argparse.Namespace) -> int:
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        if args.action == "ls":
            image_id = args.image_ids[0]
            words = client.keywords.labels(repo, image_id)
            _emit(args, {"image_id": image_id, "labels": words},
                  lambda: print(" ".join(words) if words else "(no label)"))
            return EXIT_OK
        change = (client.keywords.label_add if args.action == "add"
                  else client.keywords.label_remove)
        report = change(repo, args.image_ids, args.word)
    data = report.as_dict() if hasattr(report, "as_dict") else {}
    done = "labelled" if args.action == "add" else "unlabelled"
    shown = ", ".join(data.get("words", [args.word]))
    _emit(args, {"action": args.action, **data},
          lambda: print(f"{done} {len(args.image_ids)} image(s): {shown}"))
    return EXIT_OK

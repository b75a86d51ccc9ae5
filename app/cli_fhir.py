"""The command line's HL7 FHIR export: `radcrypt get ... --fhir out.json` and `radcrypt fhir`.

Why a module of its own: app/cli.py is shared by every helper; this one only adds options
and a subcommand, and reaches the use case through the facade (``client.pacs.export_fhir``,
app/integration/facade.py, which runs app/integration/fhir.py). The CLI's shared helpers
come from app/cli_common.py (app.cli imports this module, so it cannot import it back).

Wiring (the patch to app/cli.py): ``cli_fhir.register(sub, _command)`` in build_parser,
``cli_fhir.add_get_options(p)`` on the ``get`` parser, and ``cli_fhir.after_get(args,
client, repo)`` at the end of cmd_get, inside the client's ``with``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.cli_common import EXIT_OK, _client, _emit

FHIR_HELP = ("also write an HL7 FHIR R4 Bundle to FILE: the ImagingStudy of the image's "
             "study (series, instances, modality, body site, started; pseudonyms in a "
             "research repository) and a DocumentReference for the decrypted file")


def add_get_options(parser: argparse.ArgumentParser) -> None:
    """``get --fhir FILE``."""
    parser.add_argument("--fhir", metavar="FILE", default=None, help=FHIR_HELP)


def after_get(args: argparse.Namespace, client: Any, repo: Any) -> Path | None:
    """After `get` wrote the original: the FHIR Bundle, when ``--fhir`` asks for it (the
    DocumentReference is left out when the file went to standard output: it has no URL)."""
    dest = getattr(args, "fhir", None)
    if not dest:
        return None
    document = None if args.output == "-" else Path(args.output)
    written: Path = client.pacs.export_fhir(repo, args.image_id, Path(dest),
                                            whole_study=True, document=document)
    print(f"wrote FHIR R4 Bundle {written}", file=sys.stderr)
    return written


def register(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """`radcrypt fhir --repo R IMAGE_ID -o out.json [--document FILE] [--instance-only]`:
    the FHIR export without writing the decrypted file."""
    p = command(sub, "fhir", "write an HL7 FHIR R4 Bundle (ImagingStudy, and a "
                "DocumentReference with --document) for an archived image's study", cmd_fhir)
    p.add_argument("--repo", required=True, help="repository name")
    p.add_argument("image_id", help="the image id (from search or ls)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="where to write the Bundle (JSON)")
    p.add_argument("--document", metavar="FILE",
                   help="a decrypted copy of the image (from `get`) to describe in a "
                        "DocumentReference")
    p.add_argument("--instance-only", action="store_true",
                   help="the ImagingStudy lists only this image's instance, not its whole "
                        "study")


def cmd_fhir(args: argparse.Namespace) -> int:
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        written = client.pacs.export_fhir(
            repo, args.image_id, Path(args.output), whole_study=not args.instance_only,
            document=Path(args.document) if args.document else None)
    _emit(args, {"image_id": args.image_id, "fhir": str(written)},
          lambda: print(f"wrote FHIR R4 Bundle {written}"))
    return EXIT_OK

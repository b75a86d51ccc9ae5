"""The command line's DICOM network: `radcrypt receive`, `radcrypt send`, `radcrypt pacs
echo|find|local|node ...` and `radcrypt import --from-pacs NODE --study UID`.

Why a module of its own: app/cli.py is shared by every helper; this one registers its
subcommands (``register(sub, _command)``, called from cli.build_parser) and reaches the use
cases through the facade's facet (``client.pacs``, app/integration/facade.py). Node
commands, echo and find need no identity (no repository is touched), so they do not ask
for the password. The CLI's shared helpers come from app/cli_common.py (app.cli imports
this module, so it cannot import app.cli back).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from app.cli_common import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, _client, _emit, _progress, _usage
from app.core.errors import RadcryptError
from app.integration.model import DicomNode


def _quiet(args: argparse.Namespace) -> None:
    """pynetdicom logs every refused connection and abort as an ERROR with its internals;
    our own messages say it in one line, so it speaks only with -v."""
    if not getattr(args, "verbose", False):
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def _pacs() -> Any:
    """The facet without a client: enough for nodes, echo and find."""
    from app.integration.facade import Pacs

    return Pacs(None)


# --- registration ---------------------------------------------------------------------------


def register(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `receive`, `send` and `pacs` to the parser, and `--from-pacs`/`--study` to
    `import` (its files become optional: cli.cmd_import hands over to
    ``cmd_import_from_pacs`` when --from-pacs is given). ``command`` is
    app.cli_common's ``_command``."""
    p = command(sub, "receive", "run a DICOM Storage SCP that imports what the configured "
                "PACS and modalities send (C-STORE; C-ECHO answered) until Ctrl+C", cmd_receive)
    p.add_argument("--repo", required=True, help="repository name")
    p.add_argument("--aet", default=None, help="our AE title (default: the receiver "
                   "settings', RADCRYPT)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default: the receiver "
                   "settings', 11112)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    p.add_argument("--peer", action="append", metavar="AET@HOST",
                   help="who may send (repeatable); default: every configured DICOM node")
    p.add_argument("--tls-cert", metavar="FILE", help="DICOM TLS: our certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="DICOM TLS: its key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE", help="DICOM TLS: senders must show a "
                   "certificate this CA signed")
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="instances per committed index segment, as for a file import "
                        "(default 64)")

    p = command(sub, "send", "send decrypted originals to a DICOM node (C-STORE, or "
                "STOW-RS for a DICOMweb-only node)", cmd_send)
    p.add_argument("--repo", required=True, help="repository name")
    p.add_argument("--to", required=True, metavar="NODE", help="the node's name")
    p.add_argument("image_ids", nargs="+", metavar="IMAGE_ID", help="image ids (search, ls)")
    p.add_argument("--study", action="store_true", help="send the whole study of each image")

    p = command(sub, "pacs", "DICOM nodes: echo, find, node settings, our receiver's "
                "settings", cmd_pacs)
    pacs = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = command(pacs, "echo", "C-ECHO a node (a QIDO-RS probe for a DICOMweb-only node)",
                cmd_pacs)
    c.add_argument("node", nargs="?", help="the node's name")
    c.add_argument("--dicomweb", metavar="URL", help="probe this DICOMweb server instead")
    c = command(pacs, "find", "find studies on a node (C-FIND or QIDO-RS); with --study, "
                "the series of one study", cmd_pacs)
    c.add_argument("node", nargs="?", help="the node's name")
    c.add_argument("--dicomweb", metavar="URL", help="query this DICOMweb server (QIDO-RS) "
                   "instead of a configured node")
    c.add_argument("--patient-id", default="", help="PatientID (wildcards * ?)")
    c.add_argument("--patient-name", default="", help="PatientName, e.g. 'DOE^*'")
    c.add_argument("--date", default="", help="StudyDate: YYYYMMDD or YYYYMMDD-YYYYMMDD")
    c.add_argument("--accession", default="", help="AccessionNumber")
    c.add_argument("--modality", default="", help="a modality in the study, e.g. CT")
    c.add_argument("--study", default="", metavar="UID", help="list this study's series")
    c = command(pacs, "local", "show or set our receiver's AE title, port and TLS files "
                "(what a PACS must know to move studies to us)", cmd_pacs)
    c.add_argument("--aet", help="our AE title")
    c.add_argument("--port", type=int, help="our receiver's port")
    c.add_argument("--tls", choices=("on", "off"), help="DICOM TLS for the receiver")
    c.add_argument("--cert-file", help="our certificate (PEM)")
    c.add_argument("--key-file", help="its key (PEM, no passphrase)")
    c.add_argument("--ca-file", help="CA that signs the peers' certificates")
    c = command(pacs, "node", "add, remove, list DICOM nodes; set a DICOMweb password",
                cmd_pacs)
    node = c.add_subparsers(dest="node_action", required=True, metavar="NODE_ACTION")
    a = command(node, "add", "add or replace a node", cmd_pacs)
    a.add_argument("name", help="a short name for the node")
    a.add_argument("--aet", default="", help="its AE title (DICOM network)")
    a.add_argument("--host", default="", help="its host name or address")
    a.add_argument("--port", type=int, default=0, help="its DICOM port")
    a.add_argument("--dicomweb", default="", metavar="URL", help="its DICOMweb base URL")
    a.add_argument("--user", default="", help="DICOMweb user (password: `node passwd`)")
    a.add_argument("--tls", action="store_true", help="use DICOM TLS towards it")
    a.add_argument("--ca-file", default="", help="CA that signed its certificate")
    a.add_argument("--cert-file", default="", help="our client certificate for it")
    a.add_argument("--key-file", default="", help="the key of that certificate")
    r = command(node, "rm", "remove a node (and its kept DICOMweb password)", cmd_pacs)
    r.add_argument("name", help="the node's name")
    command(node, "ls", "list the nodes", cmd_pacs)
    w = command(node, "passwd", "keep a node's DICOMweb password in the OS keyring "
                "(asked for; or read from standard input when it is not a terminal)", cmd_pacs)
    w.add_argument("name", help="the node's name")

    imports = sub.choices.get("import")
    if imports is not None:
        imports.add_argument("--from-pacs", metavar="NODE",
                             help="import a study from this DICOM node instead of files "
                                  "(C-GET, C-MOVE or WADO-RS; all of it or nothing)")
        imports.add_argument("--dicomweb", metavar="URL", dest="from_pacs",
                             help="import a study from this DICOMweb server (QIDO-RS, "
                                  "WADO-RS) instead of a configured node")
        imports.add_argument("--study", metavar="UID", help="with --from-pacs: the study's "
                             "StudyInstanceUID (from `pacs find`)")
        imports.add_argument("--retrieve", choices=("auto", "get", "move"), default="auto",
                             help="with --from-pacs: C-GET, C-MOVE to our receiver's AE "
                                  "title and port, or auto (C-GET, else C-MOVE)")


# --- commands ---------------------------------------------------------------------------------


def cmd_import_from_pacs(args: argparse.Namespace) -> int:
    _quiet(args)
    if not args.study:
        _usage(args, "--from-pacs needs --study UID (find it with `radcrypt pacs find`)")
    if args.paths:
        _usage(args, "give files or --from-pacs, not both")
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        with _progress(not args.json, "retrieving") as progress:
            report = client.pacs.import_study(repo, args.from_pacs, args.study,
                                              progress=progress, method=args.retrieve)
        _emit(args, {"node": args.from_pacs, "study": args.study, **report.as_dict()},
              lambda: print(f"study {args.study} from {args.from_pacs}: imported "
                            f"{len(report.imported)}, already present "
                            f"{len(report.already_present)}, failed "
                            f"{len(report.failed)} in {report.seconds:.1f} s"))
        for _, reason in report.failed:
            print(f"  failed: {reason}", file=sys.stderr)
    if report.failed:
        return (EXIT_PARTIAL if report.imported or report.already_present
                else EXIT_ERROR)
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    _quiet(args)
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        with _progress(not args.json, "sending") as progress:
            report = client.pacs.send(repo, args.image_ids, args.to, whole_study=args.study,
                                      progress=progress)

    def text() -> None:
        print(f"sent {len(report.sent)} to {args.to}, failed {len(report.failed)}")
        for image_id, reason in report.failed:
            print(f"  failed: {image_id}: {reason}", file=sys.stderr)

    _emit(args, report.as_dict(), text)
    return EXIT_ERROR if report.failed else EXIT_OK


def _tls_files(args: argparse.Namespace) -> Any:
    if not (args.tls_cert or args.tls_key or args.tls_ca):
        return None
    from app.integration.facade import TlsFiles

    return TlsFiles(args.tls_cert or "", args.tls_key or "", args.tls_ca or "")


def cmd_receive(args: argparse.Namespace) -> int:
    _quiet(args)
    with _client(args) as client:
        repo = client.open_repository(args.repo)
        mine = client.pacs.receiver_settings()
        receiver = client.pacs.receiver(
            repo, aet=args.aet or mine.aet, port=args.port or mine.port, peers=args.peer,
            tls=_tls_files(args), host=args.host, batch_size=max(1, args.batch_size))
        receiver.start()
        status = receiver.status()
        print(f"receiving as {status.aet} on {args.host}:{status.port} into {repo.repo_id}; "
              "Ctrl+C stops", file=sys.stderr)
        shown = None
        try:
            while True:
                time.sleep(0.5)
                now = receiver.status()
                counts = (now.associations, now.received, now.imported, now.refused,
                          now.failed, now.last_message)
                if counts != shown and not args.json:
                    shown = counts
                    print(f"received {now.received}, imported {now.imported}, refused "
                          f"{now.refused}, failed {now.failed}"
                          + (f" - {now.last_message}" if now.last_message else ""),
                          file=sys.stderr)
        except KeyboardInterrupt:
            print("stopping: importing what was received ...", file=sys.stderr)
        final = receiver.stop()
    _emit(args, final.as_dict(),
          lambda: print(f"received {final.received}, imported {final.imported}, refused "
                        f"{final.refused}, failed {final.failed} in {final.associations} "
                        "associations"))
    return EXIT_OK


def _node_line(node: DicomNode) -> str:
    parts = []
    if node.dimse:
        parts.append(f"{node.aet}@{node.host}:{node.port}" + (" (TLS)" if node.tls else ""))
    if node.web:
        parts.append(node.dicomweb_url + (f" user {node.username}" if node.username else ""))
    return f"{node.name:<16} " + "  ".join(parts)


def cmd_pacs(args: argparse.Namespace) -> int:
    _quiet(args)
    pacs = _pacs()
    if args.action in ("echo", "find"):
        if args.dicomweb and args.node:
            _usage(args, "give a node name or --dicomweb URL, not both")
        args.node = args.node or args.dicomweb
        if not args.node:
            _usage(args, "name a node (`radcrypt pacs node ls`) or give --dicomweb URL")
    if args.action == "echo":
        result = pacs.echo(args.node)
        _emit(args, result.as_dict(),
              lambda: print(f"{args.node}: {'ok' if result.ok else 'FAILED'} - "
                            f"{result.message}"))
        return EXIT_OK if result.ok else EXIT_ERROR
    if args.action == "find":
        if args.study:
            series = pacs.find_series(args.node, args.study)
            _emit(args, {"node": args.node, "study": args.study,
                         "series": [s.as_dict() for s in series]},
                  lambda: [print(f"{s.number:>4} {s.modality:<4} {s.instance_count:>5} "
                                 f"{s.description[:30]:<30} {s.series_uid}")
                           for s in series])
            return EXIT_OK
        studies = pacs.find_studies(args.node, patient_id=args.patient_id,
                                    patient_name=args.patient_name, study_date=args.date,
                                    accession=args.accession, modality=args.modality)
        _emit(args, {"node": args.node, "studies": [s.as_dict() for s in studies]},
              lambda: [print(f"{s.study_date or '-':<8} {s.patient_name[:24]:<24} "
                             f"{s.patient_id[:12]:<12} {'/'.join(s.modalities):<6} "
                             f"{s.instance_count:>5} {s.description[:24]:<24} "
                             f"{s.study_uid}") for s in studies])
        return EXIT_OK
    if args.action == "local":
        return _local(args, pacs)
    return _node(args, pacs)


def _local(args: argparse.Namespace, pacs: Any) -> int:
    from dataclasses import replace

    settings = pacs.receiver_settings()
    changes = {k: v for k, v in (("aet", args.aet), ("port", args.port),
                                 ("cert_file", args.cert_file), ("key_file", args.key_file),
                                 ("ca_file", args.ca_file)) if v is not None}
    if args.tls is not None:
        changes["tls"] = args.tls == "on"
    if changes:
        settings = pacs.save_receiver_settings(replace(settings, **changes))
    _emit(args, settings.as_dict(),
          lambda: print(f"our AE title {settings.aet}, receiver port {settings.port}, "
                        f"TLS {'on' if settings.tls else 'off'}"))
    return EXIT_OK


def _node(args: argparse.Namespace, pacs: Any) -> int:
    action = args.node_action
    if action == "ls":
        nodes = pacs.nodes()
        _emit(args, {"nodes": [n.as_dict() for n in nodes]},
              lambda: [print(_node_line(n)) for n in nodes] if nodes
              else print("no DICOM nodes yet: `radcrypt pacs node add NAME --aet AET "
                         "--host HOST --port PORT`"))
    elif action == "add":
        node = pacs.save_node(DicomNode(
            name=args.name, aet=args.aet, host=args.host, port=args.port,
            dicomweb_url=args.dicomweb, username=args.user, tls=args.tls,
            ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file))
        _emit(args, {"node": node.as_dict()}, lambda: print(f"saved {_node_line(node)}"))
    elif action == "rm":
        pacs.remove_node(args.name)
        _emit(args, {"removed": args.name}, lambda: print(f"removed node {args.name}"))
    elif action == "passwd":
        pacs.node(args.name)  # an unknown node fails before the prompt
        if sys.stdin.isatty():
            password = getpass.getpass(f"DICOMweb password for node {args.name}: ")
        else:
            password = sys.stdin.readline().rstrip("\n")
        if not password:
            raise RadcryptError("the password is empty")
        pacs.set_web_password(args.name, password)
        _emit(args, {"node": args.name, "password_kept": True},
              lambda: print(f"password of node {args.name} kept in the OS keyring"))
    return EXIT_OK

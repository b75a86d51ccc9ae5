"""Receive throughput: instances/s through the Storage SCP (`radcrypt receive`) next to
the same files' import from disk.

    python -m bench.receive --images 200 --repeat 2 [--batch-size 64] [--out FILE]

Writes distinct 512x512 16-bit CT DICOM files (bench.ingest.make_ct_files), then, --repeat
times, in fresh repositories of a directory store:
  file import   client.import_files(paths)                      (decode, features,
                                                                 encrypt, write, commit)
  receive       dcmtk's storescu sends every file over one association to our receiver
                (client.pacs.receiver on 127.0.0.1), timed from the first byte sent to the
                last instance committed; the transfer alone (storescu's run) is reported
                too
and writes instances/s (median of the repeats) with the machine and its load average to
bench/results/receive.json. The receiver imports in batches while instances still
arrive, so receive can come close to the file import; it cannot beat it (it is the same
import, plus the network and the spool). A benchmark: it never fails on a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ingest import make_ct_files
from bench.report import write_json

PASSWORD = "bench passphrase: amber meadow 62 lantern"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(images: int, repeat: int, batch_size: int) -> dict[str, Any]:
    from app.core import client as facade
    from app.core.settings import Settings

    if shutil.which("storescu") is None:
        raise SystemExit("dcmtk's storescu is missing: `make system-deps` installs it")
    load_start = os.getloadavg()
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="radcrypt-bench-receive-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("XDG_CONFIG_HOME", str(root / "config"))
        files = make_ct_files(root / "files", images)
        settings = Settings(store="directory", data_dir=str(root / "data"), workers=2)
        identity = facade.create_identity(settings, "Bench", PASSWORD)
        with facade.Client(settings, identity) as client:
            for index in range(repeat):
                repo = client.create_repository(f"file-{index}")
                start = time.perf_counter()
                report = client.import_files(repo, files, batch_size=batch_size)
                file_s = time.perf_counter() - start
                assert len(report.imported) == images, report.failed[:3]

                repo = client.create_repository(f"recv-{index}")
                port = _free_port()
                receiver = client.pacs.receiver(repo, aet="RADCRYPT", port=port,
                                                peers=["BENCH@127.0.0.1"], host="127.0.0.1",
                                                batch_size=batch_size)
                receiver.start()
                try:
                    start = time.perf_counter()
                    sent = subprocess.run(["storescu", "-aet", "BENCH", "-aec", "RADCRYPT",
                                           "127.0.0.1", str(port), *map(str, files)],
                                          capture_output=True, text=True, check=False)
                    transfer_s = time.perf_counter() - start
                    if sent.returncode != 0:
                        raise SystemExit(f"storescu failed: {sent.stderr[-500:]}")
                    if not receiver.wait_idle(3600):
                        raise SystemExit(f"receiver did not finish: {receiver.status()}")
                    receive_s = time.perf_counter() - start
                finally:
                    status = receiver.stop()
                assert status.imported == images, status
                rounds.append({"file_import_s": file_s, "receive_s": receive_s,
                               "transfer_s": transfer_s})
                print(f"round {index + 1}: file import {images / file_s:.1f}/s, receive "
                      f"{images / receive_s:.1f}/s (transfer alone {images / transfer_s:.0f}/s)")

    def rate(key: str) -> float:
        return round(images / statistics.median(r[key] for r in rounds), 2)

    return {
        "schema": 1,
        "benchmark": "receive",
        "images": images, "image": "512x512 uint16 CT, explicit VR little endian",
        "repeat": repeat, "batch_size": batch_size, "store": "directory",
        "file_import_per_s": rate("file_import_s"),
        "receive_per_s": rate("receive_s"),
        "transfer_only_per_s": rate("transfer_s"),
        "receive_vs_file_import": round(rate("receive_s") / rate("file_import_s"), 3),
        "rounds": [{k: round(v, 3) for k, v in r.items()} for r in rounds],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_average_at_start": load_start,
                    "load_average_at_end": os.getloadavg()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "receive.json")
    args = parser.parse_args()
    write_json(args.out, run(args.images, args.repeat, args.batch_size))


if __name__ == "__main__":
    main()

"""The search service's options and their checks, shared by `python -m cloud.service` and
`radcrypt serve` (one definition; light to import, so the CLI's start stays quick).

The service id (the audience named in every signed request) is ``--service-id``, else
RADCRYPT_SERVICE_ID, else a random id created once and kept in ``<cache dir>/service-id``
(the cache dir is ``--cache-dir`` or the user cache dir's radcrypt/service): it survives
restarts, and deleting it gives the deployment a new id (clients learn it again from
GET /v1/info).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from cloud import cpus, layout  # names only (re, secrets), small files: light
from cloud.gpu.device import parse_device  # re and dataclasses: light

REFRESH_INTERVAL = 5.0
MAX_NONCES = 200_000
ADDRESS_RATE = 50.0  # requests a second per client address, before authentication
ADDRESS_BURST = 200.0
USER_RATE = 50.0  # requests a second per authenticated user
USER_BURST = 100.0
SERVICE_ID_FILE = "service-id"
SHARD_DEADLINE = 10.0  # seconds a cluster front waits for a shard (cloud/cluster)
MAX_SHARDS, MAX_REPLICAS = 1024, 16
SERVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_service_id(service_id: object) -> str:
    """A service id: 1..64 ASCII letters, digits, '.', '_' or '-', starting alphanumeric."""
    if not isinstance(service_id, str) or not SERVICE_ID_RE.fullmatch(service_id):
        raise ValueError("invalid service id: use 1..64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return service_id


def parse_owner_keys(text: str) -> list[bytes]:
    """Comma-separated base64 Ed25519 public keys (RADCRYPT_OWNER_KEYS, --owner-key)."""
    keys = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            key = base64.b64decode(item, validate=True)
        except (ValueError, binascii.Error):
            raise ValueError(f"owner key {item[:12]}... is not base64") from None
        if len(key) != 32:
            raise ValueError("an owner key is a 32-byte Ed25519 public key")
        if key not in keys:
            keys.append(key)
    return keys


def new_service_id() -> str:
    return "svc-" + secrets.token_hex(16)


def persisted_service_id(root: Path) -> str:
    """The deployment's id, kept in ``root/service-id`` (created once, at random)."""
    path = root / SERVICE_ID_FILE
    for _ in range(2):
        try:
            return validate_service_id(path.read_text(encoding="ascii").strip())
        except FileNotFoundError:
            pass
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"the service id file {path} is damaged: delete it or give "
                             "--service-id") from None
        root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue  # another service made it first: read theirs
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(new_service_id() + "\n")
    return validate_service_id(path.read_text(encoding="ascii").strip())


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or the name localhost: only this machine can connect."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """The service's options, shared by `python -m cloud.service` and `radcrypt serve`."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default "
                        "127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765,
                        help="TCP port to listen on (default 8765)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where index arrays are memory-mapped and the service id is "
                             "kept (default: the user cache dir)")
    parser.add_argument("--owner-key", action="append", default=[],
                        help="base64 Ed25519 public key of a data owner whose repositories "
                             "this service serves (repeatable); also RADCRYPT_OWNER_KEYS, "
                             "comma separated. Required unless --insecure-no-auth.")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="answer anyone without a signature; refused unless --host is "
                             "a loopback address")
    parser.add_argument("--service-id", default=None,
                        help="this deployment's id, which signed requests must name "
                             "(default: RADCRYPT_SERVICE_ID, else a random id kept in the "
                             "cache dir)")
    parser.add_argument("--docs", action="store_true",
                        help="serve /docs, /redoc and /openapi.json")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate (https)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key (https)")
    parser.add_argument("--max-nonces", type=int, default=MAX_NONCES,
                        help="replay cache size; when full, requests get 503 + Retry-After")
    parser.add_argument("--address-rate", type=float, default=ADDRESS_RATE,
                        help="requests per second per client address, before authentication")
    parser.add_argument("--address-burst", type=float, default=ADDRESS_BURST,
                        help="burst allowed per client address")
    parser.add_argument("--user-rate", type=float, default=USER_RATE,
                        help="requests per second per authenticated user")
    parser.add_argument("--user-burst", type=float, default=USER_BURST,
                        help="burst allowed per authenticated user")
    parser.add_argument("--preload", action="append", default=[], metavar="REPO",
                        help="repository id to load and warm at start-up (repeatable); "
                             "also RADCRYPT_SERVICE_REPOS, comma separated. /readyz answers "
                             "503 until they are loaded, and their searches 503 'warming'")
    parser.add_argument("--threads", default=None, metavar="N",
                        help="threads the search engine runs (default: RADCRYPT_THREADS, "
                             "else the CPUs this process may use: affinity and cgroup "
                             "CPU quota)")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="where searches run: cpu (default), cuda or cuda:N, the GPU "
                             "backend (needs radcrypt[gpu]); also RADCRYPT_DEVICE")
    parser.add_argument("--refresh-interval", type=float, default=REFRESH_INTERVAL,
                        help=argparse.SUPPRESS)
    cluster = parser.add_argument_group("cluster (radcrypt[cluster], docs/SCALING.md)")
    cluster.add_argument("--ray-address", default=None, metavar="ADDR",
                         help="search on this Ray cluster (host:port of its head): shard "
                              "actors hold the segments, this process authenticates, fans "
                              "out and merges")
    cluster.add_argument("--shards", type=int, default=None, metavar="N",
                         help="shards the segments are split into (default 1; with "
                              "--ray-address only)")
    cluster.add_argument("--replicas", type=int, default=None, metavar="R",
                         help="actors serving each shard (default 1; with --ray-address "
                              "only)")
    cluster.add_argument("--shard-deadline", type=float, default=None, metavar="SECONDS",
                         help="a shard that has not answered by then makes the search a "
                              "503 naming it (default 10)")
    cluster.add_argument("--resize", action="store_true", default=None,
                         help="when the deployment (this --service-id) runs with another "
                              "shard count, resize it to --shards while it serves "
                              "(without: join it as it is laid out)")


@dataclass(frozen=True)
class ServiceConfig:
    host: str
    port: int
    cache_root: Path
    owner_keys: list[bytes]
    insecure_no_auth: bool
    service_id: str
    docs: bool
    tls_cert: Path | None
    tls_key: Path | None
    max_nonces: int
    address_rate: float
    address_burst: float
    refresh_interval: float
    preload: tuple[str, ...] = ()
    user_rate: float = USER_RATE
    user_burst: float = USER_BURST
    threads: int | None = None  # the engine's (cloud/cpus.py); None: as the process finds
    device: str = "cpu"  # cpu, cuda:N (cloud/gpu/device.py)
    ray_address: str | None = None  # cloud/cluster: search on this Ray cluster
    shards: int = 1
    replicas: int = 1
    shard_deadline: float = SHARD_DEADLINE
    resize: bool = False  # --resize: bring the running deployment to --shards shards

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"


def service_config(args: argparse.Namespace,
                   environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """Checked options; ValueError (one line, plain words) when the service must not start."""
    env = os.environ if environ is None else environ
    keys = parse_owner_keys(",".join([*args.owner_key, env.get("RADCRYPT_OWNER_KEYS", "")]))
    if not keys and not args.insecure_no_auth:
        raise ValueError("no owner key: give --owner-key (or RADCRYPT_OWNER_KEYS) with the "
                         "public key of each data owner whose repositories this service "
                         "serves; refusing to answer anyone unauthenticated")
    if args.insecure_no_auth and not keys and not is_loopback(args.host):
        raise ValueError(f"--insecure-no-auth is refused on {args.host}: without "
                         "authentication the service may only listen on a loopback address "
                         "(127.0.0.1, ::1, localhost)")
    if args.insecure_no_auth and keys:
        raise ValueError("--insecure-no-auth and owner keys together: choose one")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{option} {path}: no such file")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: must be 1..65535")
    user_rate = getattr(args, "user_rate", USER_RATE)
    user_burst = getattr(args, "user_burst", USER_BURST)
    if (args.max_nonces < 1 or args.address_rate <= 0 or args.address_burst < 1
            or user_rate <= 0 or user_burst < 1):
        raise ValueError("--max-nonces, --address-rate, --address-burst, --user-rate and "
                         "--user-burst must be positive")
    preload = []
    for item in [*getattr(args, "preload", []),
                 *env.get("RADCRYPT_SERVICE_REPOS", "").split(",")]:
        item = item.strip()
        if item and item not in preload:
            try:
                preload.append(layout.validate_repo_id(item))
            except ValueError as exc:
                raise ValueError(f"--preload: {exc}") from None
    given = getattr(args, "threads", None)
    threads = (cpus.parse_threads(given, "--threads") if given is not None
               else cpus.configured_threads(env))
    device = str(parse_device(getattr(args, "device", None)
                              or env.get("RADCRYPT_DEVICE", "") or "cpu"))
    ray_address, shards, replicas, deadline = _cluster_options(args)
    root = args.cache_dir or Path(platformdirs.user_cache_dir("radcrypt")) / "service"
    chosen = args.service_id or env.get("RADCRYPT_SERVICE_ID") or ""
    service_id = validate_service_id(chosen) if chosen else persisted_service_id(root)
    return ServiceConfig(args.host, args.port, root, keys, args.insecure_no_auth, service_id,
                         args.docs, args.tls_cert, args.tls_key, args.max_nonces,
                         args.address_rate, args.address_burst, args.refresh_interval,
                         tuple(preload), user_rate, user_burst, threads, device,
                         ray_address, shards, replicas, deadline,
                         bool(getattr(args, "resize", None)) and ray_address is not None)


def _cluster_options(args: argparse.Namespace) -> tuple[str | None, int, int, float]:
    """--ray-address, --shards, --replicas, --shard-deadline, checked: the last three
    only with the first (a lone --shards would otherwise be silently ignored)."""
    address = (getattr(args, "ray_address", None) or "").strip() or None
    given = {"--shards": getattr(args, "shards", None),
             "--replicas": getattr(args, "replicas", None),
             "--shard-deadline": getattr(args, "shard_deadline", None),
             "--resize": getattr(args, "resize", None)}
    if address is None:
        named = [name for name, value in given.items() if value is not None]
        if named:
            raise ValueError(f"{', '.join(named)} only with --ray-address (the cluster)")
        return None, 1, 1, SHARD_DEADLINE
    shards = given["--shards"] if given["--shards"] is not None else 1
    replicas = given["--replicas"] if given["--replicas"] is not None else 1
    deadline = given["--shard-deadline"] if given["--shard-deadline"] is not None \
        else SHARD_DEADLINE
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"--shards {shards}: must be 1..{MAX_SHARDS}")
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"--replicas {replicas}: must be 1..{MAX_REPLICAS}")
    if not 0 < deadline <= 600:
        raise ValueError(f"--shard-deadline {deadline}: must be more than 0 and at most 600 s")
    return address, int(shards), int(replicas), float(deadline)

"""The search service's trust boundary, attacked over real HTTP (issue 11: items 1, the
service items of "Low", and "a user record is believed only when signed by the owner of
the repository in question").

Each test starts the product's own entry point (`radcrypt serve` or `python -m
cloud.service`) as a process on a real S3 server (moto), writes the bucket the way an owner
(or an attacker who can write the bucket) would, and performs the attack. Manifests are
built here directly, following the shared contract (DESIGN §3): an owner-signed
``sign_json(owner, "manifest", name, payload)`` whose payload carries ``sequence``,
``members`` ([{"user_id", "key_version"}], sorted) and ``owner``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.identity import RequestSigner
from app.core.service_client import EmbeddedService, ServiceClient
from cloud import layout
from cloud.store import ObjectStore, StoreConfig
from crypto.identity import Identity
from crypto.signed import sign_json, sign_record

try:
    import e2e_support as support
    import s3servers
except ImportError:  # pragma: no cover
    from tests import e2e_support as support
    from tests import s3servers

SERVICE_ID = "svc-test-a"
OTHER_SERVICE_ID = "svc-test-b"
UNAUTHORIZED = {"detail": "unauthorized"}
CLI = (support.PYTHON, "-m", "app.cli", "serve")
MODULE = (support.PYTHON, "-m", "cloud.service")


# --- the bucket, written as the owner (or an attacker) would --------------------------------


@dataclasses.dataclass
class People:
    owner: Identity
    other_owner: Identity  # a second data owner trusted by the same deployment
    alice: Identity
    bob: Identity
    carol: Identity  # registered by the other owner only


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_user(store: ObjectStore, signer: Identity, user: Identity) -> None:
    name = layout.user_key(user.user_id)
    card = user.card()
    payload: dict[str, object] = {"card": card.to_json(), "fingerprint": card.fingerprint,
                                  "registered": datetime.datetime.now(
                                      datetime.timezone.utc).isoformat(timespec="seconds")}
    store.put(name, sign_json(signer, "user", name, payload))


def manifest_blob(owner: Identity, repo: str, sequence: int, key_version: int,
                  members: dict[str, int] | None) -> bytes:
    """The owner-signed manifest of the contract; ``members`` None: a legacy manifest."""
    name = layout.manifest_key(repo)
    payload: dict[str, object] = {"repo_id": repo, "name": repo, "dim": 128,
                                  "extractor": "radcrypt-v1", "key_version": key_version}
    if members is not None:
        payload.update({
            "sequence": sequence, "owner": owner.user_id,
            "members": [{"user_id": u, "key_version": members[u]} for u in sorted(members)]})
    return sign_json(owner, "manifest", name, payload)


def write_grant(store: ObjectStore, owner: Identity, repo: str, user: Identity) -> None:
    """A grant object signed by the owner (its content does not matter to the service)."""
    name = layout.grant_key(repo, user.user_id)
    store.put(name, sign_record(owner, "grant", name, b"wrapped ring of " + user.user_id.encode()))


def new_repo() -> str:
    return "sec-" + os.urandom(4).hex()


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket_config(moto_store_config: StoreConfig) -> Iterator[StoreConfig]:
    config = dataclasses.replace(moto_store_config, bucket=s3servers.unique_bucket("auth"))
    ObjectStore(config).ensure_bucket()
    yield config
    s3servers.drop_bucket(config)


@pytest.fixture(scope="module")
def store(bucket_config: StoreConfig) -> ObjectStore:
    return ObjectStore(bucket_config)


@pytest.fixture(scope="module")
def people(store: ObjectStore) -> People:
    p = People(Identity.generate("Dr Owner"), Identity.generate("Dr Other Owner"),
               Identity.generate("Alice"), Identity.generate("Bob"), Identity.generate("Carol"))
    for user in (p.owner, p.alice, p.bob):
        write_user(store, p.owner, user)
    write_user(store, p.other_owner, p.other_owner)
    write_user(store, p.other_owner, p.carol)
    return p


def owner_args(people: People, *extra: str, service_id: str = SERVICE_ID) -> list[str]:
    return ["--owner-key", b64(people.owner.sign_public),
            "--owner-key", b64(people.other_owner.sign_public),
            "--service-id", service_id, *extra]


@pytest.fixture(scope="module")
def service(bucket_config: StoreConfig, people: People,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[support.ServiceProcess]:
    """`radcrypt serve` itself, trusting both owners, as a deployment would run it."""
    log = tmp_path_factory.mktemp("auth") / "serve.log"
    with support.ServiceProcess(bucket_config, log, refresh_interval=None, command=[
            *CLI, "--store", "s3", "--endpoint", str(bucket_config.endpoint_url),
            "--bucket", bucket_config.bucket], service_args=owner_args(people)) as svc:
        yield svc
    assert support.wait_gone(svc.pid)


def post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None,
         **kwargs: Any) -> httpx.Response:
    return httpx.post(url + path, content=body, timeout=30.0,
                      headers={"content-type": "application/json", **(headers or {})},
                      **kwargs)


def signed(identity: Identity, path: str, body: bytes = b"{}",
           service_id: str = SERVICE_ID) -> dict[str, str]:
    return RequestSigner(identity).headers("POST", path, body, service_id)


def refresh_as(url: str, identity: Identity, repo: str,
               service_id: str = SERVICE_ID) -> httpx.Response:
    path = f"/v1/repos/{repo}/refresh"
    return post(url, path, b"{}", signed(identity, path, service_id=service_id))


def run_refused(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Start a service that must refuse to start: it exits by itself, quickly."""
    return subprocess.run(args, cwd=support.PROJECT, env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


# --- item 1: one entry point, no owner key no service ---------------------------------------


@pytest.mark.parametrize("entry", ["radcrypt serve", "python -m cloud.service"])
def test_unsigned_refresh_and_search_get_401(bucket_config: StoreConfig, people: People,
                                             store: ObjectStore, tmp_path: Path,
                                             entry: str) -> None:
    repo = new_repo()
    store.put(layout.manifest_key(repo), manifest_blob(people.owner, repo, 1, 1,
                                                       {people.owner.user_id: 1}))
    command = MODULE if entry != "radcrypt serve" else (
        *CLI, "--store", "s3", "--endpoint", str(bucket_config.endpoint_url),
        "--bucket", bucket_config.bucket)
    keys = {"RADCRYPT_OWNER_KEYS": b64(people.owner.sign_public)}  # from the environment
    with support.ServiceProcess(bucket_config, tmp_path / "svc.log", refresh_interval=None,
                                command=command, service_args=[], extra_env=keys) as svc:
        search = json.dumps({"token": "AAAA", "k": 1, "key_version": 1}).encode()
        for path, body in ((f"/v1/repos/{repo}/refresh", b"{}"),
                           (f"/v1/repos/{repo}/search", search)):
            response = post(svc.url, path, body)
            assert response.status_code == 401, response.text
            assert response.json() == UNAUTHORIZED
        assert refresh_as(svc.url, people.owner, repo,
                          svc_id(svc.url)).status_code == 200  # the owner, signed: served


def svc_id(url: str, **kwargs: Any) -> str:
    return str(httpx.get(url + "/v1/info", timeout=10, **kwargs).json()["service_id"])


@pytest.mark.parametrize("command", [CLI, MODULE], ids=["radcrypt serve", "cloud.service"])
def test_serve_refuses_to_start_without_owner_keys(bucket_config: StoreConfig,
                                                   command: tuple[str, ...]) -> None:
    env = support.store_env(bucket_config)
    env.pop("RADCRYPT_OWNER_KEYS", None)
    extra = ["--store", "s3", "--endpoint", str(bucket_config.endpoint_url)] \
        if command == CLI else []
    done = run_refused([*command, *extra, "--port", str(support.free_port())], env)
    assert done.returncode == 2, done.stderr
    assert "no owner key" in done.stderr and "--owner-key" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "example.org"])
def test_insecure_no_auth_is_refused_off_loopback(bucket_config: StoreConfig,
                                                  host: str) -> None:
    env = support.store_env(bucket_config)
    env.pop("RADCRYPT_OWNER_KEYS", None)
    done = run_refused([*MODULE, "--insecure-no-auth", "--host", host,
                        "--port", str(support.free_port())], env)
    assert done.returncode == 2, done.stderr
    assert "loopback" in done.stderr and "Traceback" not in done.stderr


def test_embedded_service_trusts_the_owner_keys_it_is_given(bucket_config: StoreConfig,
                                                            people: People,
                                                            store: ObjectStore,
                                                            tmp_path: Path) -> None:
    """The service a client starts for itself: unsigned requests refused, the signed
    client (which learns the service id from /v1/info) served."""
    repo = new_repo()
    store.put(layout.manifest_key(repo), manifest_blob(
        people.owner, repo, 1, 1, {people.owner.user_id: 1, people.alice.user_id: 1}))
    embedded = EmbeddedService(bucket_config, tmp_path, [people.owner.sign_public])
    try:
        assert post(embedded.url, f"/v1/repos/{repo}/refresh", b"{}").status_code == 401
        client = ServiceClient(embedded.url, RequestSigner(people.alice))
        try:
            assert client.refresh(repo)["images"] == 0
            assert client.service_id == embedded.service_id
        finally:
            client.close()
    finally:
        embedded.stop()


def test_embedded_service_trusts_the_owner_of_a_repository_opened_later(
        bucket_config: StoreConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's first session on a workstation: the embedded service is already running
    (trusting only the user's own key) when she opens a repository of an owner not yet
    pinned; her search must still be served (the service is restarted trusting him)."""
    from app.core.access import (
        create_repository_as,
        grant_access,
        open_repository_as,
        register_user,
        session_for,
    )
    from app.core.settings import Settings

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", bucket_config.access_key or "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bucket_config.secret_key or "testing")
    owner, alice = Identity.generate("Owner"), Identity.generate("Alice")

    def settings(who: str) -> Settings:
        return Settings(store="s3", endpoint_url=bucket_config.endpoint_url,
                        bucket=bucket_config.bucket, data_dir=str(tmp_path / who))

    name = new_repo()
    with session_for(settings("owner"), owner) as session:
        repo = create_repository_as(session, owner, name)
        register_user(session, owner, alice.card().to_json())
        grant_access(session, owner, repo, alice.user_id)
    with session_for(settings("alice"), alice) as session:
        session.service.health()  # started before any repository was opened
        opened = open_repository_as(session, alice, name)
        assert session.service.refresh(opened.repo_id)["images"] == 0


# --- item 2: authorisation = membership of the current signed manifest -----------------------


def test_revoked_user_gets_403_even_with_a_grant_object(service: support.ServiceProcess,
                                                        people: People,
                                                        store: ObjectStore) -> None:
    repo = new_repo()
    owner, alice, bob = people.owner, people.alice, people.bob
    for user in (owner, alice, bob):
        write_grant(store, owner, repo, user)
    store.put(layout.manifest_key(repo), manifest_blob(
        owner, repo, 1, 1, {owner.user_id: 1, alice.user_id: 1, bob.user_id: 1}))
    assert refresh_as(service.url, bob, repo).status_code == 200
    # bob revoked: a new key version, a new manifest without him; his grant object is
    # still there (or restored by someone who can write under grants/)
    store.put(layout.manifest_key(repo), manifest_blob(
        owner, repo, 2, 2, {owner.user_id: 2, alice.user_id: 2}))
    write_grant(store, owner, repo, bob)
    time.sleep(2.2)  # the positive membership cache
    response = refresh_as(service.url, bob, repo)
    assert response.status_code == 403 and response.json() == {"detail": "forbidden"}
    assert refresh_as(service.url, alice, repo).status_code == 200
    # listed, but at a superseded key version: not served either
    store.put(layout.manifest_key(repo), manifest_blob(
        owner, repo, 3, 2, {owner.user_id: 2, alice.user_id: 2, bob.user_id: 1}))
    assert refresh_as(service.url, bob, repo).status_code == 403


def test_rollback_to_an_older_manifest_is_refused(service: support.ServiceProcess,
                                                  people: People, store: ObjectStore) -> None:
    repo = new_repo()
    owner, bob = people.owner, people.bob
    old = manifest_blob(owner, repo, 1, 1, {owner.user_id: 1, bob.user_id: 1})
    store.put(layout.manifest_key(repo), old)
    write_grant(store, owner, repo, bob)
    assert refresh_as(service.url, bob, repo).status_code == 200
    store.put(layout.manifest_key(repo), manifest_blob(owner, repo, 2, 2, {owner.user_id: 2}))
    time.sleep(2.2)
    assert refresh_as(service.url, owner, repo).status_code == 200  # the service sees seq 2
    assert refresh_as(service.url, bob, repo).status_code == 403
    store.put(layout.manifest_key(repo), old)  # the cloud puts the old, validly signed one back
    response = refresh_as(service.url, bob, repo)
    assert response.status_code == 403, "an older manifest (sequence 1 < 2) was believed"
    time.sleep(2.2)  # once the owner's cached answer expires: nobody, on a rollback
    assert refresh_as(service.url, owner, repo).status_code == 403


def test_legacy_manifest_without_members_serves_nobody(service: support.ServiceProcess,
                                                       people: People,
                                                       store: ObjectStore) -> None:
    repo = new_repo()
    store.put(layout.manifest_key(repo), manifest_blob(people.owner, repo, 1, 1, None))
    write_grant(store, people.owner, repo, people.owner)
    write_grant(store, people.owner, repo, people.alice)
    for user in (people.owner, people.alice):
        assert refresh_as(service.url, user, repo).status_code == 403


def test_manifest_of_an_untrusted_owner_serves_nobody(service: support.ServiceProcess,
                                                      people: People,
                                                      store: ObjectStore) -> None:
    """Someone who can write the bucket signs a manifest with their own key."""
    repo = new_repo()
    intruder = Identity.generate("Mallory")
    store.put(layout.manifest_key(repo), manifest_blob(
        intruder, repo, 1, 1, {people.alice.user_id: 1, people.owner.user_id: 1}))
    assert refresh_as(service.url, people.alice, repo).status_code == 403


# --- item 3: a user record is believed only when signed by that repository's owner -----------


def test_user_record_of_another_owner_is_not_believed(service: support.ServiceProcess,
                                                      people: People,
                                                      store: ObjectStore) -> None:
    """Carol's record is signed by the other owner (trusted by the deployment, but not the
    owner of this repository): the owner's manifest naming her does not let her in."""
    repo = new_repo()
    owner, carol = people.owner, people.carol
    store.put(layout.manifest_key(repo), manifest_blob(
        owner, repo, 1, 1, {owner.user_id: 1, carol.user_id: 1}))
    write_grant(store, owner, repo, carol)
    response = refresh_as(service.url, carol, repo)
    assert response.status_code in (401, 403)
    # her own owner's repository serves her: the record itself is fine
    theirs = new_repo()
    store.put(layout.manifest_key(theirs), manifest_blob(
        people.other_owner, theirs, 1, 1, {people.other_owner.user_id: 1, carol.user_id: 1}))
    assert refresh_as(service.url, carol, theirs).status_code == 200


# --- item 4: bare 401 before the body, strict time, no docs, short health ------------------


@pytest.mark.parametrize("body", [b"{not json", b"\xff" * 100, b'{"k": "many"}', b"[]",
                                  b'{"token": 5, "key_version": 0}'])
def test_unauthenticated_garbage_gets_a_bare_401(service: support.ServiceProcess,
                                                 body: bytes) -> None:
    response = post(service.url, f"/v1/repos/{new_repo()}/search", body)
    assert response.status_code == 401, response.text
    assert response.json() == UNAUTHORIZED
    for word in ("loc", "msg", "JSON", "UTF-8", "token", "k"):
        assert f'"{word}"' not in response.text


def test_invalid_repository_name_unauthenticated_is_401(service: support.ServiceProcess) -> None:
    response = post(service.url, "/v1/repos/Bad_Repo/search", b"{}")
    assert response.status_code == 401 and response.json() == UNAUTHORIZED


@pytest.mark.parametrize("stamp", ["9" * 10_000, "1" * 13, "١٧٣٦٩٣٣٤٠٠", "¹⁷³⁶⁹³³⁴⁰⁰",
                                   "+1736933400", "1_736_933_400", "1736933400.0", ""],
                         ids=["10000 digits", "13 digits", "arabic-indic digits",
                              "superscript digits", "plus sign", "underscores", "decimal",
                              "empty"])
def test_odd_time_header_gets_401(service: support.ServiceProcess, people: People,
                                  stamp: str) -> None:
    path = f"/v1/repos/{new_repo()}/refresh"
    headers = signed(people.alice, path)
    headers["x-radcrypt-time"] = stamp
    encoded = {k.encode(): v.encode("utf-8") for k, v in headers.items()}
    response = httpx.post(service.url + path, content=b"{}", headers=encoded, timeout=30)
    assert response.status_code == 401, response.text
    assert response.json() == UNAUTHORIZED


def test_docs_and_schema_only_with_the_docs_flag(service: support.ServiceProcess) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(service.url + path, timeout=10).status_code == 404


def test_healthz_says_only_ok(service: support.ServiceProcess, people: People,
                              store: ObjectStore) -> None:
    repo = new_repo()
    store.put(layout.manifest_key(repo), manifest_blob(people.owner, repo, 1, 1,
                                                       {people.owner.user_id: 1}))
    assert refresh_as(service.url, people.owner, repo).status_code == 200  # a repo loaded
    response = httpx.get(service.url + "/healthz", timeout=10)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


# --- item 5: the audience ----------------------------------------------------------------


def test_request_replayed_to_another_deployment_gets_401(
        bucket_config: StoreConfig, service: support.ServiceProcess, people: People,
        store: ObjectStore, tmp_path: Path) -> None:
    repo = new_repo()
    store.put(layout.manifest_key(repo), manifest_blob(
        people.owner, repo, 1, 1, {people.owner.user_id: 1, people.alice.user_id: 1}))
    assert svc_id(service.url) == SERVICE_ID
    path = f"/v1/repos/{repo}/refresh"
    captured = signed(people.alice, path)  # signed for deployment A
    with support.ServiceProcess(bucket_config, tmp_path / "b.log", refresh_interval=None,
                                service_args=owner_args(people, service_id=OTHER_SERVICE_ID)
                                ) as other:
        assert svc_id(other.url) == OTHER_SERVICE_ID
        replayed = post(other.url, path, b"{}", captured)  # same bucket, same owners
        assert replayed.status_code == 401 and replayed.json() == UNAUTHORIZED
        assert refresh_as(other.url, people.alice, repo,
                          OTHER_SERVICE_ID).status_code == 200  # signed for B: served
    assert post(service.url, path, b"{}", captured).status_code == 200  # A: the original


# --- item 6: bounded nonce cache, unknown users, per-address limit -------------------------


def test_nonce_cache_full_answers_503_and_forgets_no_nonce(
        bucket_config: StoreConfig, people: People, store: ObjectStore,
        tmp_path: Path) -> None:
    repo = new_repo()
    store.put(layout.manifest_key(repo), manifest_blob(
        people.owner, repo, 1, 1, {people.owner.user_id: 1, people.alice.user_id: 1}))
    path = f"/v1/repos/{repo}/refresh"
    with support.ServiceProcess(bucket_config, tmp_path / "n.log", refresh_interval=None,
                                service_args=owner_args(people, "--max-nonces", "3")) as svc:
        first = signed(people.alice, path)
        assert post(svc.url, path, b"{}", first).status_code == 200
        for _ in range(2):
            assert refresh_as(svc.url, people.alice, repo).status_code == 200
        full = refresh_as(svc.url, people.alice, repo)
        assert full.status_code == 503, full.text
        assert 1 <= int(full.headers["retry-after"]) <= 302
        assert refresh_as(svc.url, people.owner, repo).status_code == 503
        # the first request's nonce was not dropped to make room: its replay stays refused
        assert post(svc.url, path, b"{}", first).status_code == 401


def test_unknown_user_is_remembered_as_a_refusal(service: support.ServiceProcess,
                                                 people: People, store: ObjectStore) -> None:
    repo = new_repo()
    dave = Identity.generate("Dave")
    store.put(layout.manifest_key(repo), manifest_blob(
        people.owner, repo, 1, 1, {people.owner.user_id: 1, dave.user_id: 1}))
    assert refresh_as(service.url, dave, repo).status_code == 401  # not registered
    write_user(store, people.owner, dave)  # registered now, but the refusal is cached
    assert refresh_as(service.url, dave, repo).status_code == 401
    time.sleep(10.5)  # UNKNOWN_USER_CACHE_SECONDS
    assert refresh_as(service.url, dave, repo).status_code == 200


def test_per_address_rate_limit_applies_before_authentication(
        bucket_config: StoreConfig, people: People, tmp_path: Path) -> None:
    with support.ServiceProcess(bucket_config, tmp_path / "r.log", refresh_interval=None,
                                service_args=owner_args(people, "--address-rate", "0.2",
                                                        "--address-burst", "8")) as svc:
        codes = [post(svc.url, f"/v1/repos/{new_repo()}/search", b"{}").status_code
                 for _ in range(12)]
        assert 401 in codes and 429 in codes, codes
        assert codes.index(429) >= 1 and set(codes[codes.index(429):]) == {429}, codes
        limited = post(svc.url, "/v1/repos/x/refresh", b"{}")
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1


# --- item 7: TLS -----------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_serves_https(bucket_config: StoreConfig, people: People, store: ObjectStore,
                          tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    repo = new_repo()
    store.put(layout.manifest_key(repo), manifest_blob(people.owner, repo, 1, 1,
                                                       {people.owner.user_id: 1}))
    with support.ServiceProcess(bucket_config, tmp_path / "tls.log", refresh_interval=None,
                                scheme="https",
                                service_args=owner_args(people, "--tls-cert", str(cert),
                                                        "--tls-key", str(key))) as svc:
        assert svc.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(cert))
        response = httpx.get(svc.url + "/healthz", verify=trust, timeout=10)
        assert response.status_code == 200 and response.json() == {"status": "ok"}
        client = ServiceClient(svc.url, RequestSigner(people.owner), verify=str(cert))
        try:
            assert client.refresh(repo)["images"] == 0  # signed, over TLS
        finally:
            client.close()
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not answered
            httpx.get(f"http://127.0.0.1:{svc.port}/healthz", timeout=5)


def test_tls_options_go_together(bucket_config: StoreConfig, people: People,
                                 tmp_path: Path) -> None:
    cert, _ = _self_signed(tmp_path)
    done = run_refused([*MODULE, *owner_args(people, "--tls-cert", str(cert)),
                        "--port", str(support.free_port())], support.store_env(bucket_config))
    assert done.returncode == 2 and "--tls-key" in done.stderr


def test_service_id_is_kept_per_deployment(tmp_path: Path) -> None:
    """Without --service-id, a deployment keeps one random id across restarts (in its cache
    dir); another deployment gets another one, and --service-id wins over both."""
    from cloud.service_options import add_service_arguments, service_config

    def config(*argv: str) -> str:
        import argparse

        parser = argparse.ArgumentParser()
        add_service_arguments(parser)
        args = parser.parse_args(["--owner-key", b64(bytes(32)), *argv])
        return service_config(args, environ={}).service_id

    first = config("--cache-dir", str(tmp_path / "a"))
    assert first.startswith("svc-") and config("--cache-dir", str(tmp_path / "a")) == first
    assert config("--cache-dir", str(tmp_path / "b")) != first
    assert config("--cache-dir", str(tmp_path / "a"), "--service-id", "ward-7") == "ward-7"
    with pytest.raises(ValueError, match="service id"):
        config("--service-id", "two\nlines")

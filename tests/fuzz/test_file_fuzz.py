"""Issue 14, file fuzzing: mutated real files meet every reader of untrusted bytes.

What "passes" means, for each reader: the mutated file is read, or refused with the
reader's own documented error type (ImageDecodeError, SegmentError, the crypto layer's
FormatError/DecryptionError, LogError, RadcryptError) carrying a message that names what
is wrong; never another exception type, a crash or a hang. Images are decoded where the
product decodes them, in the decoder child (app/imaging/worker.py) with its memory limit
and a 10 s timeout: a child that dies or times out fails the test.

Readers and their seeds (tests/fuzz/corpus.py): the image decoders over every transfer
syntax in the pydicom sample data and over PNG/JPEG/TIFF; segments of format 1 and 2
(whole and streamed); packs; segment-log entries and checkpoints; signed manifests; grants;
the identity file and its public card; query tokens. Authenticated formats are fuzzed
twice: blind (the authentication must stop the mutation) and resealed (checksum, MAC,
envelope or signature rebuilt around mutated content, so the parsers behind them run).

Mutations are hypothesis examples (a failure prints the shrunk list of edits, which
reproduces it, and a reproduction blob). ``make test``: about EXAMPLES mutations per reader
kind (shared among its variants: blind, resealed, JSON edits; for images, among the seed
files); ``make soak`` (``-m soak``): SOAK_EXAMPLES per kind (images: SOAK_PER_IMAGE_SEED
per seed file and SOAK_PER_DICOM_SEED attribute edits per DICOM seed). Each run prints how
its examples ended.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from app.core import access
from app.core.errors import RadcryptError
from app.core.identity import CARD_FILE, IDENTITY_FILE, IdentityStore
from app.core.repository import read_manifest, read_signed_manifest
from app.imaging.errors import ImageDecodeError
from app.imaging.features import EXTRACTOR_NAME
from app.imaging.worker import DIED, FAILED, DecoderPool
from cloud import layout, seglog
from cloud.directory_store import DirectoryStore
from cloud.seglog_format import decode_payload
from cloud.segments import SegmentError, decode_authenticated, decode_segment, read_segment
from crypto.errors import CryptoError, FormatError
from crypto.identity import seal_identity
from crypto.keys import KeyRing
from crypto.pack import open_pack
from crypto.recipient import unwrap_for_recipient, wrap_to_recipient
from crypto.signed import open_record, sign_json, sign_record
from crypto.tokens import QueryToken

try:
    import corpus
except ImportError:  # pragma: no cover
    from tests.fuzz import corpus

EXAMPLES = 100
"""Mutations per reader kind in ``make test``."""
SOAK_EXAMPLES = 1000
"""Mutations per reader kind in ``make soak``."""
SOAK_PER_IMAGE_SEED = 80
"""Image decoders are where a crash (C code: OpenJPEG, libjpeg, zlib, libtiff) would be:
in ``make soak`` each of the 15 image seeds gets this many byte mutations (1,200)."""
SOAK_PER_DICOM_SEED = 60
"""Attribute edits per DICOM seed in ``make soak`` (9 seeds: 540; they re-write the file
with pydicom, so they cost three times a byte mutation)."""
DECODE_SECONDS = 10.0
"""The decoder child's timeout, and the most any one read may take."""
READ_SECONDS = 5.0
"""The most a non-image reader may take on one mutated file (they read kilobytes, in
milliseconds: the margin is for a loaded test machine)."""
PASSWORD = "correct horse battery staple 14"
SECRETS = (corpus.DATA_KEY.hex(), corpus.MAC_KEY.hex(), PASSWORD)


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


def _check_message(exc: BaseException) -> None:
    """A clear error: some words, and no key or password in them."""
    text = str(exc)
    assert len(text) >= 8, f"{type(exc).__name__} with no useful message: {text!r}"
    for secret in SECRETS:
        assert secret not in text, f"a secret in the message: {text!r}"


def fuzz(label: str, seed: bytes, read: Callable[[bytes], object],
         allowed: tuple[type[BaseException], ...], examples: int, *,
         build: Callable[[bytes, list[corpus.Mutation]], bytes] | None = None,
         limit: float = READ_SECONDS, start: int = 0) -> Counter[str]:
    """Run ``read`` on ``examples`` mutations of ``seed`` (``build`` makes the file from the
    seed and the edits: default, the edits applied to the bytes). Returns how they ended."""
    outcomes: Counter[str] = Counter()

    @_settings(examples)
    @given(ops=corpus.mutations(len(seed), start=start))
    def one(ops: list[corpus.Mutation]) -> None:
        note(f"{label}: edits {ops!r}")
        data = build(seed, ops) if build is not None else corpus.apply_all(seed, ops)
        if data == seed:
            outcomes["unchanged"] += 1
            return
        began = time.monotonic()
        try:
            read(data)
            outcomes["read"] += 1
        except allowed as exc:
            _check_message(exc)
            outcomes[type(exc).__name__] += 1
        elapsed = time.monotonic() - began
        assert elapsed < limit, f"{label}: one file took {elapsed:.1f} s (limit {limit:g} s)"

    started = time.monotonic()
    one()
    print(f"\n[file fuzz] {label}: {sum(outcomes.values())} files in "
          f"{time.monotonic() - started:.1f} s: {dict(sorted(outcomes.items()))}")
    assert sum(outcomes.values()) >= min(examples, 10)
    return outcomes


def counts(soak: bool, variants: int = 1) -> int:
    """Examples for one of ``variants`` ways of fuzzing one reader kind."""
    return -(-(SOAK_EXAMPLES if soak else EXAMPLES) // variants)


MODES = [pytest.param(False, id="test"), pytest.param(True, id="soak", marks=pytest.mark.soak)]


# --- images, decoded in the decoder child ----------------------------------------------------


@pytest.fixture(scope="module")
def image_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    seeds = {f"dicom-{k}": v for k, v in corpus.dicom_seeds().items()}
    seeds.update(corpus.raster_seeds(tmp_path_factory.mktemp("raster")))
    return seeds


@pytest.fixture(scope="module")
def pool() -> Iterator[DecoderPool]:
    with DecoderPool(size=1, timeout=DECODE_SECONDS, memory_limit=1024**3) as decoders:
        yield decoders


def test_every_transfer_syntax_and_raster_format_is_seeded(image_seeds: dict[str, Path]) -> None:
    labels = set(image_seeds)
    # the transfer syntaxes of the pydicom sample data (tests/test_imaging_decode.py)
    assert {"dicom-explicit-le", "dicom-implicit-le", "dicom-explicit-be", "dicom-deflated",
            "dicom-jpeg-baseline", "dicom-j2k", "dicom-j2k-lossless", "dicom-rle",
            "dicom-no-meta"} <= labels
    assert {"png-grey", "png-rgb", "jpeg-grey", "jpeg-rgb", "tiff-16",
            "tiff-rgb-deflate"} <= labels


_BROKEN_DECODER = (DIED, "the decoder took longer", FAILED)


def _decode_in_child(pool: DecoderPool, folder: Path) -> Callable[[bytes], object]:
    def read(data: bytes) -> object:
        path = folder / "mutated"
        path.write_bytes(data)
        try:
            # what an import asks (every frame of a multi-frame file, capped here at 4)
            return pool.analyse_frames(path, extractor=EXTRACTOR_NAME, preview=True,
                                       max_frames=4, digest=hashlib.sha256(data).digest())
        except ImageDecodeError as exc:
            assert not exc.reason.startswith(_BROKEN_DECODER), (
                f"the decoder broke instead of refusing the file: {exc}")
            raise
    return read


@pytest.mark.parametrize("soak", MODES)
def test_image_decoders(soak: bool, image_seeds: dict[str, Path], pool: DecoderPool,
                        tmp_path: Path) -> None:
    examples = SOAK_PER_IMAGE_SEED if soak else counts(soak, len(image_seeds))
    total: Counter[str] = Counter()
    read = _decode_in_child(pool, tmp_path)
    for label, path in image_seeds.items():
        seed = path.read_bytes()
        read(seed)  # the seed itself decodes
        total += fuzz(label, seed, read, (ImageDecodeError,), examples, limit=DECODE_SECONDS,
                      start=corpus.sniffed_prefix(seed))
    print(f"[file fuzz] images: {sum(total.values())} files: {dict(total)}")


def fuzz_attributes(label: str, seed: bytes, read: Callable[[bytes], object],
                    examples: int) -> Counter[str]:
    """Run ``read`` on ``examples`` DICOM files made from ``seed`` by attribute edits."""
    outcomes: Counter[str] = Counter()

    @_settings(examples)
    @given(edits=corpus.dicom_edits())
    def one(edits: list[tuple[str, object]]) -> None:
        note(f"{label}: edits {edits!r}")
        data = corpus.edit_dicom(seed, edits)
        if data is None:
            outcomes["unwritable"] += 1
            return
        start = time.monotonic()
        try:
            read(data)
            outcomes["read"] += 1
        except ImageDecodeError as exc:
            _check_message(exc)
            outcomes["ImageDecodeError"] += 1
        assert time.monotonic() - start < DECODE_SECONDS

    one()
    print(f"\n[file fuzz] {label} attributes: {dict(sorted(outcomes.items()))}")
    assert outcomes["read"] + outcomes["ImageDecodeError"] >= examples // 2
    return outcomes


@pytest.mark.parametrize("soak", MODES)
def test_dicom_attribute_edits(soak: bool, image_seeds: dict[str, Path], pool: DecoderPool,
                               tmp_path: Path) -> None:
    """Hostile pixel-module attributes (sizes, bit depths, colour model, frames, rescale,
    window) in files re-written in every transfer syntax: refused or decoded in the child."""
    dicom = {k: v for k, v in image_seeds.items() if k.startswith("dicom-")}
    examples = SOAK_PER_DICOM_SEED if soak else counts(soak, len(dicom))
    read = _decode_in_child(pool, tmp_path)
    total: Counter[str] = Counter()
    for label, path in dicom.items():
        total += fuzz_attributes(label, path.read_bytes(), read, examples)
    print(f"[file fuzz] DICOM attribute edits: {dict(total)}")


# --- segments ---------------------------------------------------------------------------------

SEGMENT_NAME = layout.segment_key(corpus.REPO_ID, corpus.SEG_ID)


def _outcome(read: Callable[[], object]) -> SegmentError | None:
    try:
        read()
    except SegmentError as exc:
        return exc
    return None


def _read_segment_everyway(data: bytes) -> object:
    """decode_segment and the streamed read_segment (uneven chunks) must agree, error for
    error (same checks, same order, same words); a member's decode_authenticated refuses
    at least what they refuse. The first error is raised."""
    whole = _outcome(lambda: decode_segment(data, SEGMENT_NAME))
    streamed = _outcome(lambda: read_segment(
        (data[i:i + 97] for i in range(0, len(data), 97)), SEGMENT_NAME,
        lambda n: memoryview(bytearray(n)), len(data)))
    member = _outcome(lambda: decode_authenticated(data, SEGMENT_NAME, corpus.REPO_ID,
                                                   {1: corpus.MAC_KEY}))
    assert str(whole) == str(streamed), f"decode_segment: {whole}; read_segment: {streamed}"
    assert whole is None or member is not None, f"a member accepts what decode refuses: {whole}"
    if whole is not None:
        raise whole
    if member is not None:
        raise member
    return None


@pytest.mark.parametrize("soak", MODES)
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("resealed", [False, True], ids=["blind", "resealed"])
def test_segment_reader(version: int, resealed: bool, soak: bool) -> None:
    seed = corpus.segment_v1() if version == 1 else corpus.segment_v2()
    build = (lambda s, ops: corpus.reseal_segment(corpus.apply_all(s, ops))) if resealed else None
    outcomes = fuzz(f"segment v{version} {'resealed' if resealed else 'blind'}", seed,
                    _read_segment_everyway, (SegmentError,), counts(soak, 4), build=build)
    if not resealed:
        assert outcomes["read"] == 0, "a blind mutation passed the segment's checksum"


# --- packs ------------------------------------------------------------------------------------


def _open_pack(data: bytes) -> object:
    return open_pack(corpus.DATA_KEY, corpus.REPO_ID, corpus.PACK_ID, data)


@pytest.mark.parametrize("soak", MODES)
@pytest.mark.parametrize("part", ["blind", "toc", "features"])
def test_pack_reader(part: str, soak: bool) -> None:
    build = {"blind": None, "toc": corpus.reseal_pack_toc,
             "features": corpus.reseal_pack_features}[part]
    fuzz(f"pack {part}", corpus.pack(), _open_pack, (CryptoError,), counts(soak, 3), build=build)


# --- the segment log: entries and checkpoints ---------------------------------------------


@pytest.fixture(scope="module")
def people() -> corpus.People:
    return corpus.people()


def _trust(people: corpus.People) -> seglog.StaticTrust:
    return seglog.StaticTrust("fuzz-owner", people.owner.sign_public, 2, 1,
                              {corpus.WRITER: people.member.sign_public})


@pytest.mark.parametrize("soak", MODES)
@pytest.mark.parametrize("resealed", [False, True], ids=["blind", "resealed"])
def test_log_entry_reader(resealed: bool, soak: bool, people: corpus.People) -> None:
    payload = corpus.log_payload()
    trust = _trust(people)

    def read(blob: bytes) -> object:
        entry = seglog.open_entry(blob, corpus.REPO_ID, 3, trust)
        return decode_payload(seglog.signed.open_record(  # the slow, reference verifier agrees
            blob, "log", layout.log_entry_key(corpus.REPO_ID, 3),
            [people.member.sign_public, people.owner.sign_public]),
            layout.log_entry_key(corpus.REPO_ID, 3)) == entry

    build: Callable[[bytes, list[corpus.Mutation]], bytes] | None
    if resealed:
        seed = payload

        def build(s: bytes, ops: list[corpus.Mutation]) -> bytes:
            return corpus.sign_log_record(people.member, 3, corpus.apply_all(s, ops))
    else:
        seed = corpus.sign_log_record(people.member, 3, payload)
        build = None
    read(corpus.sign_log_record(people.member, 3, payload))
    fuzz(f"log entry {'resealed' if resealed else 'blind'}", seed, read,
         (FormatError, seglog.LogError), counts(soak, 2), build=build)


# JSON documents: byte mutations of the signed document, and structural edits of the
# payload (a field replaced by any JSON value, removed, or added) signed again.

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(max_size=40) | st.sampled_from(["", "0", "segment", "pack", "ab" * 16, "ab" * 32,
                                              corpus.SEG_ID, "fuzz-owner", corpus.WRITER]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@st.composite
def json_edits(draw: st.DrawFn, payload: dict[str, Any]) -> dict[str, Any]:
    """The payload with 1..3 edits at random paths (deep copies; the seed is untouched)."""
    doc = copy.deepcopy(payload)
    for _ in range(draw(st.integers(1, 3))):
        node: Any = doc
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, (dict, list)) and child and draw(st.booleans()):
                node = child
                continue
            action = draw(st.sampled_from(["replace", "remove", "add"]))
            if action == "replace":
                node[key] = draw(JSON_VALUES)
            elif action == "remove":
                del node[key]
            elif isinstance(node, dict):
                node[draw(st.text(max_size=8))] = draw(JSON_VALUES)
            else:
                node.append(draw(JSON_VALUES))
            break
    return doc


def _same(got: object, original: object) -> object:
    """A blind mutation that still verifies must not change what was signed."""
    assert got == original, f"a blind mutation changed a signed document: {got!r}"
    return got


def fuzz_json(label: str, payload: dict[str, Any], sign: Callable[[dict[str, Any]], bytes],
              read: Callable[[bytes], object], allowed: tuple[type[BaseException], ...],
              examples: int) -> Counter[str]:
    """Structural edits of a signed JSON payload, signed again, then read."""
    outcomes: Counter[str] = Counter()

    @_settings(examples)
    @given(doc=json_edits(payload))
    def one(doc: dict[str, Any]) -> None:
        blob = sign(doc)
        start = time.monotonic()
        try:
            read(blob)
            outcomes["read"] += 1
        except allowed as exc:
            _check_message(exc)
            outcomes[type(exc).__name__] += 1
        assert time.monotonic() - start < READ_SECONDS

    one()
    print(f"\n[file fuzz] {label}: {sum(outcomes.values())} documents: "
          f"{dict(sorted(outcomes.items()))}")
    return outcomes


@pytest.mark.parametrize("soak", MODES)
@pytest.mark.parametrize("mode", ["blind", "json"])
def test_checkpoint_reader(mode: str, soak: bool, people: corpus.People) -> None:
    name = layout.checkpoint_key(corpus.REPO_ID, 3)
    owner_key = people.owner.sign_public

    def read(blob: bytes) -> object:
        return seglog.open_checkpoint(blob, corpus.REPO_ID, 3, owner_key)

    payload = corpus.checkpoint_payload()
    seed = sign_json(people.owner, "checkpoint", name, payload)
    original = read(seed)
    if mode == "blind":  # what still verifies (JSON layout is not signed) is the same
        fuzz("checkpoint blind", seed, lambda blob: _same(read(blob), original),
             (FormatError,), counts(soak, 2))
    else:
        fuzz_json("checkpoint json", payload,
                  lambda doc: sign_json(people.owner, "checkpoint", name, doc),
                  read, (FormatError,), counts(soak, 2))


# --- manifests, grants ------------------------------------------------------------------------


@pytest.fixture()
def store(tmp_path: Path) -> DirectoryStore:
    bucket = DirectoryStore(tmp_path / "bucket")
    bucket.ensure_bucket()
    return bucket


@pytest.mark.parametrize("soak", MODES)
@pytest.mark.parametrize("mode", ["blind", "json"])
def test_manifest_reader(mode: str, soak: bool, people: corpus.People,
                         store: DirectoryStore) -> None:
    key = layout.manifest_key(corpus.REPO_ID)
    owner_key = people.owner.sign_public

    def read(blob: bytes) -> object:
        store.put(key, blob)
        try:
            read_manifest(store, corpus.REPO_ID)  # parameters, read without trust
        except RadcryptError:
            pass
        return read_signed_manifest(store, corpus.REPO_ID, owner_key)

    payload = corpus.manifest_payload()
    seed = sign_json(people.owner, "manifest", key, payload)
    original = read(seed)
    if mode == "blind":  # what still verifies (JSON layout is not signed) is the same
        fuzz("manifest blind", seed, lambda blob: _same(read(blob), original),
             (RadcryptError,), counts(soak, 2))
    else:
        fuzz_json("manifest json", payload,
                  lambda doc: sign_json(people.owner, "manifest", key, doc),
                  read, (RadcryptError,), counts(soak, 2))


@pytest.mark.parametrize("soak", MODES)
@pytest.mark.parametrize("resealed", [False, True], ids=["blind", "resealed"])
def test_grant_reader(resealed: bool, soak: bool, people: corpus.People,
                      store: DirectoryStore) -> None:
    name = layout.grant_key(corpus.REPO_ID, corpus.WRITER)
    member = people.member
    owner_key = people.owner.sign_public
    context = access._context(corpus.REPO_ID, corpus.WRITER)

    def grant_of(ring: bytes) -> bytes:
        wrapped = wrap_to_recipient(ring, member.enc_public, context)
        return sign_record(people.owner, "grant", name, wrapped)

    def read(blob: bytes) -> object:
        # the steps of app/core/access.py's _open_grant, whose errors it turns into
        # AccessDenied: the owner's signature, the X25519 unwrap, the key ring's parser
        store.put(name, blob)
        wrapped = open_record(store.get(name), "grant", name, [owner_key])
        ring = KeyRing.from_bytes(unwrap_for_recipient(wrapped, member.enc_private,
                                                       context))
        assert ring.repo_id == corpus.REPO_ID or resealed
        return ring

    ring = corpus.key_ring_bytes()
    read(grant_of(ring))
    if resealed:
        fuzz("grant resealed", ring, read, (CryptoError,), counts(soak, 2),
             build=lambda s, ops: grant_of(corpus.apply_all(s, ops)))
    else:
        fuzz("grant blind", grant_of(ring), read, (CryptoError,), counts(soak, 2))


# --- the identity file and its card -------------------------------------------------------


@pytest.mark.parametrize("soak", MODES)
@pytest.mark.parametrize("part", ["blind", "resealed", "card"])
def test_identity_reader(part: str, soak: bool, people: corpus.People, tmp_path: Path) -> None:
    identity = people.member
    folder = tmp_path / "data"
    folder.mkdir()
    identities = IdentityStore(folder, scrypt_log2_n=10)

    if part == "card":
        seed = identity.card().to_json().encode()

        def read(data: bytes) -> object:
            (folder / CARD_FILE).write_bytes(data)
            return identities.card()
        build = None
    else:
        def read(data: bytes) -> object:
            (folder / IDENTITY_FILE).write_bytes(data)
            return identities.unlock(PASSWORD)
        if part == "blind":
            seed, build = seal_identity(identity, PASSWORD, log2_n=10), None
        else:
            seed = identity.to_bytes()

            def build(s: bytes, ops: list[corpus.Mutation]) -> bytes:
                from crypto.keys import wrap_with_password

                return wrap_with_password(corpus.apply_all(s, ops), PASSWORD, log2_n=10)
    fuzz(f"identity {part}", seed, read, (RadcryptError,), counts(soak, 3), build=build)


# --- query tokens (what the service parses from every search request) -----------------------


@pytest.mark.parametrize("soak", MODES)
def test_query_token_reader(soak: bool) -> None:
    _, vectors = corpus.segment_parts(2, (4, 6))
    seed = QueryToken(full=vectors.full, levels=vectors.levels).to_bytes()
    fuzz("query token", seed, QueryToken.from_bytes, (FormatError,), counts(soak))


# --- findings, kept as plain regression tests ----------------------------------------------


HOSTILE_JSON = {
    "nested": b'{"payload": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b'}, "signature": 1}',
    "long-number": b'{"payload": {"a": ' + b"9" * 5000 + b'}, "signature": 1}',
    "not-utf8": b'{"payload": {"a": "\xff\xfe"}, "signature": 1}',
    "nan": b'{"payload": {"a": NaN}, "signer": "AAAA", "signature": 1}',
}


@pytest.mark.parametrize("document", list(HOSTILE_JSON))
@pytest.mark.parametrize("reader", ["checkpoint", "manifest", "signed-manifest", "card"])
def test_hostile_json_documents(reader: str, document: str, people: corpus.People,
                                store: DirectoryStore, tmp_path: Path) -> None:
    """JSON that json.loads refuses with RecursionError or a bare ValueError (found by this
    fuzzer: they escaped the readers) is refused with the reader's own error type."""
    blob = HOSTILE_JSON[document]
    owner_key = people.owner.sign_public
    if reader == "checkpoint":
        with pytest.raises(FormatError, match=r"checkpoint|JSON|signed"):
            seglog.open_checkpoint(blob, corpus.REPO_ID, 3, owner_key)
    elif reader in ("manifest", "signed-manifest"):
        store.put(layout.manifest_key(corpus.REPO_ID), blob)
        with pytest.raises(RadcryptError, match="manifest"):
            if reader == "manifest":
                read_manifest(store, corpus.REPO_ID)
            else:
                read_signed_manifest(store, corpus.REPO_ID, owner_key)
    else:
        (tmp_path / CARD_FILE).write_bytes(blob)
        with pytest.raises(RadcryptError, match="card"):
            IdentityStore(tmp_path).card()


def test_huge_window_gives_finite_features(image_seeds: dict[str, Path]) -> None:
    """Window width 1e308 (found by the attribute edits): the float32 window became an
    infinite bound, the display NaN and the feature extractor raised in the child."""
    import numpy as np

    from app.imaging.decode import decode_bytes
    from app.imaging.worker import analyse

    seed = image_seeds["dicom-implicit-le"].read_bytes()
    for function in ("LINEAR", "SIGMOID"):
        data = corpus.edit_dicom(seed, [("WindowCenter", "0"), ("WindowWidth", "1e308"),
                                        ("VOILUTFunction", function)])
        assert data is not None
        image = decode_bytes(data, "huge-window.dcm")
        assert image.window == (0.0, 1e308)
        assert np.isfinite(image.normalised()).all()
        assert np.isfinite(analyse(image, EXTRACTOR_NAME, True).features).all()


def test_pixel_data_that_contradicts_the_frame_count_is_refused(
        image_seeds: dict[str, Path]) -> None:
    """Pixel data holding more frames than Number of Frames says: pydicom returns them all,
    and DecodedImage refused the 3-D array with an internal message; now a clear one."""
    from app.imaging.decode import decode_bytes

    seed = image_seeds["dicom-deflated"].read_bytes()
    data = corpus.edit_dicom(seed, [("Columns", 2), ("PixelData", "double")])
    assert data is not None
    with pytest.raises(ImageDecodeError, match="pixel data decodes to an array of shape"):
        decode_bytes(data, "frames.dcm")

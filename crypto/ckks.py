"""The homomorphic search scheme (issue 19, ``--search ckks``): CKKS through TenSEAL's SEAL.

Why a second scheme: secure-kNN (crypto/sknn.py) is exact and fast but falls to a
known-plaintext attacker (SECURITY.md). Under CKKS the service multiplies ciphertexts it
cannot decrypt; it never sees a score, a feature or a query, only sizes and timing.

Packing (column-major, diagonal). N = 8192 gives S = 4096 slots. A *block* holds up to S
vectors of dimension d, padded to a period p (the smallest power of two >= d, so p divides
S). Block ciphertext r (r = 0 .. p-1) holds in slot s the coordinate (s + r) mod p of vector
s:  B_r[s] = X[s, (s + r) mod p].  The query is one ciphertext holding q repeated with
period p: Q[s] = q[s mod p]. Rotating it left by r gives Q_r[s] = q[(s + r) mod p], so

    score[s] = sum_r Q_r[s] * B_r[s] + N[s] = x_s . q - |x_s|^2 / 2

where N is one more ciphertext per block holding -|x_s|^2 / 2 (encoded at the product's
scale, so it is added before the single rescale). Ranking by that score is ranking by
Euclidean distance (|x - q|^2 = |q|^2 - 2 score). A query costs p - 1 rotations by one slot
(once per query, whatever n is) and p ciphertext products per S vectors, not one rotation-sum
per vector. The service returns one score ciphertext per block.

A block of few vectors (an import batch of 64) would still cost p + 1 ciphertexts
diagonally, so small blocks use the ROWS layout: S/p vectors side by side per ciphertext,
with a second ciphertext holding -|x|^2/2 at each window's first slot; the service multiplies
by the query, sums each window with log2(p) rotations and adds the norms (``layout_for``
picks whichever stores fewer ciphertexts; compaction writes full diagonal blocks).

Parameters (SECURITY.md, docs/FORMAT-2.md): N = 8192, coefficient modulus 60 + 40 + 60 bits
(160 <= 218, the HE standard's bound for 128-bit classical security at N = 8192, which SEAL
checks: ``SEC_LEVEL_TYPE.TC128``), scale 2^40, one multiplicative level. Evaluation keys
(relinearisation, and the Galois key of a rotation by one) are public and stored in the
bucket; the secret key is never serialised: it is regenerated from a 64-byte seed derived
from the key version's data key (HKDF), so it rotates with the key version and lives in the
key ring like every key.

CKKS is approximate: ``ERROR_BOUND`` bounds |decrypted score - true score| for vectors of
norm at most ``MAX_NORM``; the client re-scores every candidate within twice the bound of the
k-th score from the exact (AES-GCM) features, so the answer it shows is exact. Decrypted
scores never go back to the service (Li and Micciancio, EUROCRYPT 2021: CKKS decryptions
leak the secret key).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from crypto.errors import FormatError

POLY_DEGREE = 8192
SLOTS = POLY_DEGREE // 2
COEFF_BITS = (60, 40, 60)
SCALE = 2.0**40
SEED_WORDS = 8
MAX_NORM = 64.0  # feature vectors above this norm are refused (the bound below assumes it)
# |error| of one decrypted score, measured at 2e-6 for unit vectors (bench/ckks.py); the
# bound leaves four orders of magnitude for norms up to MAX_NORM and d up to 4096.
ERROR_BOUND = 1e-2
SCORE_LIMIT = 1.5 * MAX_NORM**2 + 1.0
MAGIC = b"RCKK"
FORMAT_VERSION = 1
_HEAD = struct.Struct(">4sBBHI")  # magic, version, kind, period, count
HEADER_SIZE = _HEAD.size  # 12: what ``header`` reads
KIND_BLOCK, KIND_QUERY, KIND_SCORES, KIND_EVAL, KIND_ROWS = 1, 2, 3, 4, 5
DIAGONAL, ROWS = "diagonal", "rows"


F64 = NDArray[np.float64]


def _seal() -> Any:
    """TenSEAL's SEAL bindings, imported on first use (the ckks extra)."""
    try:
        from tenseal import sealapi
    except ImportError as exc:  # pragma: no cover - the ckks extra is missing
        raise FormatError("the homomorphic search mode needs TenSEAL: "
                          "pip install 'radcrypt[ckks]'") from exc
    return sealapi


def period_of(dim: int) -> int:
    """The packing period: the smallest power of two >= dim (it divides SLOTS)."""
    if not 1 <= dim <= SLOTS:
        raise FormatError(f"feature dimension {dim} is outside 1..{SLOTS} for CKKS packing")
    return 1 << (dim - 1).bit_length()


def galois_elements(period: int) -> list[int]:
    """Rotations left by 1, 2, 4, ..., period/2 slots: Galois element 3^step mod 2N."""
    return [pow(3, 1 << i, 2 * POLY_DEGREE) for i in range(max(1, (period - 1).bit_length()))]


def seed_from_data_key(data_key: bytes, repo_id: str, version: int) -> bytes:
    """The CKKS secret key's seed of a key version: HKDF-style HMAC of the data key, bound
    to the repository and the version (another repository or version: another key)."""
    info = b"radcrypt/ckks/seed/v1\x00" + repo_id.encode() + b"\x00" + struct.pack(">Q", version)
    out = b""
    block = b""
    counter = 1
    while len(out) < SEED_WORDS * 8:
        block = hmac.new(data_key, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[: SEED_WORDS * 8]


def _parameters(seed: bytes | None = None) -> Any:
    seal = _seal()
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(POLY_DEGREE)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(POLY_DEGREE, list(COEFF_BITS)))
    if seed is not None:
        words = list(struct.unpack(f">{SEED_WORDS}Q", seed))
        parms.set_random_generator(seal.Blake2xbPRNGFactory(words))
    return parms


def _context(seed: bytes | None = None) -> Any:
    seal = _seal()
    context = seal.SEALContext(_parameters(seed), True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise FormatError("the CKKS parameters are not valid for 128-bit security")
    return context


class _Scratch:
    """A private folder for SEAL's file-only serialisation of public objects (ciphertexts
    and evaluation keys; the secret key is never serialised). On /dev/shm when there is one,
    so nothing goes to a disk; 0700; removed at exit of the process."""

    _lock = threading.Lock()
    _path: Path | None = None

    @classmethod
    def path(cls) -> Path:
        with cls._lock:
            if cls._path is None or not cls._path.exists():
                base = "/dev/shm" if os.path.isdir("/dev/shm") else None
                cls._path = Path(tempfile.mkdtemp(prefix="radcrypt-ckks-", dir=base))
                import atexit

                atexit.register(shutil.rmtree, str(cls._path), True)
            return cls._path

    @classmethod
    @contextmanager
    def file(cls) -> Iterator[Path]:
        fd, name = tempfile.mkstemp(dir=cls.path())
        os.close(fd)
        try:
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)


def _save(obj: Any) -> bytes:
    with _Scratch.file() as path:
        obj.save(str(path))  # SEAL compresses with zstd by default
        return path.read_bytes()


def _load(kind: Any, context: Any, data: bytes, what: str) -> Any:
    obj = kind()
    with _Scratch.file() as path:
        path.write_bytes(data)
        try:
            obj.load(context, str(path))
        except Exception as exc:  # SEAL raises RuntimeError/ValueError/... on bad bytes
            raise FormatError(f"{what} is not a valid CKKS object for these parameters "
                              f"({type(exc).__name__})") from None
    return obj


def pack_parts(kind: int, period: int, count: int, parts: Sequence[bytes]) -> bytes:
    out = [_HEAD.pack(MAGIC, FORMAT_VERSION, kind, period, count),
           struct.pack(">I", len(parts))]
    for part in parts:
        out += [struct.pack(">I", len(part)), part]
    return b"".join(out)


def header(data: bytes, what: str) -> tuple[int, int, int]:
    """(kind, period, count) of a serialised CKKS object, without reading its parts."""
    if len(data) < _HEAD.size:
        raise FormatError(f"{what} is too short for a CKKS object")
    magic, version, kind, period, count = _HEAD.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise FormatError(f"{what} is not a CKKS object")
    return kind, period, count


def unpack_parts(data: bytes, kind: int, what: str) -> tuple[int, int, list[bytes]]:
    if len(data) < _HEAD.size + 4:
        raise FormatError(f"{what} is too short for a CKKS object")
    magic, version, got, period, count = _HEAD.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION or got != kind:
        raise FormatError(f"{what} is not a CKKS object of the expected kind")
    (n,) = struct.unpack_from(">I", data, _HEAD.size)
    offset, parts = _HEAD.size + 4, []
    for _ in range(n):
        if offset + 4 > len(data):
            raise FormatError(f"{what} is truncated")
        (size,) = struct.unpack_from(">I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise FormatError(f"{what} is truncated")
        parts.append(data[offset : offset + size])
        offset += size
    if offset != len(data):
        raise FormatError(f"{what} has trailing bytes")
    return period, count, parts


@dataclass(frozen=True)
class EncryptedBlock:
    """Up to SLOTS vectors, packed and encrypted (``period`` + 1 ciphertexts, serialised)."""

    period: int
    count: int
    data: bytes


class CkksKey:
    """The client's side of a key version: encrypt blocks and queries, decrypt scores.

    Holds SEAL objects, not bytes: the secret key exists only inside SEAL's memory and is
    rebuilt from the seed (``seed_from_data_key``) whenever needed."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_WORDS * 8:
            raise FormatError("a CKKS seed is 64 bytes")
        seal = _seal()
        self._keygen_context = _context(seed)
        self.context = _context()  # fresh randomness for every encryption
        keygen = seal.KeyGenerator(self._keygen_context)
        self._secret = keygen.secret_key()
        self._keygen = keygen
        self._encryptor = seal.Encryptor(self.context, self._secret)
        self._decryptor = seal.Decryptor(self.context, self._secret)
        self._encoder = seal.CKKSEncoder(self.context)
        self._lock = threading.Lock()  # SEAL's encryptor is not documented thread-safe

    def __repr__(self) -> str:
        return "CkksKey(<secret>)"

    def evaluation_keys(self, period: int) -> bytes:
        """Public evaluation keys for the service: relinearisation and the rotations by
        1, 2, 4, ..., period/2 slots (Galois elements 3^step mod 2N), all both layouts need.
        Only the secret key is deterministic from the seed; the key-switching keys carry
        fresh randomness."""
        seal = _seal()
        relin, galois = seal.RelinKeys(), seal.GaloisKeys()
        self._keygen.create_relin_keys(relin)
        self._keygen.create_galois_keys(galois_elements(period), galois)
        return pack_parts(KIND_EVAL, 0, 0, [_save(relin), _save(galois)])

    def _encrypt(self, values: F64, scale: float) -> bytes:
        seal = _seal()
        plain, cipher = seal.Plaintext(), seal.Ciphertext()
        with self._lock:
            self._encoder.encode(values.tolist(), scale, plain)
            self._encryptor.encrypt_symmetric(plain, cipher)
        return _save(cipher)

    def encrypt_block(self, vectors: F64, layout: str | None = None) -> EncryptedBlock:
        """Pack and encrypt up to SLOTS vectors (rows of ``vectors``) in the layout that
        needs fewer ciphertexts (``layout_for``) unless one is named."""
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2 or not 1 <= x.shape[0] <= SLOTS:
            raise FormatError(f"a CKKS block holds 1..{SLOTS} vectors, got shape {x.shape}")
        norms = np.einsum("ij,ij->i", x, x)
        if not np.isfinite(norms).all() or norms.max() > MAX_NORM**2:
            raise FormatError(f"a feature vector's norm exceeds {MAX_NORM:g} (or is not "
                              "finite): the CKKS error bound would not hold")
        count, dim = x.shape
        period = period_of(dim)
        layout = layout or layout_for(count, period)
        if layout == DIAGONAL:
            padded = np.zeros((SLOTS, period))
            padded[:count, :dim] = x
            slot = np.arange(SLOTS)
            parts = [self._encrypt(padded[slot, (slot + r) % period], SCALE)
                     for r in range(period)]
            half = np.zeros(SLOTS)
            half[:count] = -0.5 * norms
            parts.append(self._encrypt(half, SCALE * SCALE))
            return EncryptedBlock(period, count, pack_parts(KIND_BLOCK, period, count, parts))
        if layout != ROWS:
            raise FormatError(f"unknown CKKS block layout {layout!r}")
        per = SLOTS // period  # vectors per ciphertext
        parts = []
        for start in range(0, count, per):
            chunk = x[start : start + per]
            padded = np.zeros((per, period))
            padded[: len(chunk), :dim] = chunk
            half = np.zeros((per, period))
            half[: len(chunk), 0] = -0.5 * norms[start : start + per]
            parts += [self._encrypt(padded.reshape(-1), SCALE),
                      self._encrypt(half.reshape(-1), SCALE * SCALE)]
        return EncryptedBlock(period, count, pack_parts(KIND_ROWS, period, count, parts))

    def encrypt_query(self, query: F64, period: int) -> bytes:
        """One ciphertext: the query repeated with the block period (both layouts)."""
        q = np.asarray(query, dtype=np.float64).reshape(-1)
        if q.shape[0] > period or not np.isfinite(q).all() or float(q @ q) > MAX_NORM**2:
            raise FormatError("the CKKS query does not fit the repository's feature "
                              "dimension or norm bound")
        padded = np.zeros(period)
        padded[: q.shape[0]] = q
        return pack_parts(KIND_QUERY, period, 1,
                          [self._encrypt(np.tile(padded, SLOTS // period), SCALE)])

    def _decrypt(self, part: bytes) -> F64:
        seal = _seal()
        cipher = _load(seal.Ciphertext, self.context, part, "a CKKS score ciphertext")
        plain = seal.Plaintext()
        with self._lock:
            self._decryptor.decrypt(cipher, plain)
            values = self._encoder.decode_double(plain)
        return np.asarray(values, dtype=np.float64)

    def decrypt_scores(self, data: bytes, counts: Sequence[int]) -> F64:
        """The scores of every block, in block order (``counts``: vectors per block)."""
        _, n, parts = unpack_parts(data, KIND_SCORES, "the CKKS scores")
        if n != len(parts) or len(parts) != len(counts):
            raise FormatError(f"the service returned scores for {len(parts)} blocks, "
                              f"expected {len(counts)}")
        out = []
        for part, count in zip(parts, counts, strict=True):
            kind, period, got = header(part, "a CKKS block's scores")
            _, _, cts = unpack_parts(part, kind, "a CKKS block's scores")
            if got != count or kind not in (KIND_BLOCK, KIND_ROWS) or not cts:
                raise FormatError("the service returned scores of another block")
            if kind == KIND_BLOCK:
                out.append(self._decrypt(cts[0])[:count])
                continue
            per = SLOTS // max(period, 1)
            if len(cts) != -(-count // per):
                raise FormatError("the service returned scores of another block")
            rows = [self._decrypt(c)[::period] for c in cts]  # a window's sum at its start
            out.append(np.concatenate(rows)[:count])
        scores = np.concatenate(out) if out else np.zeros(0)
        # |x.q - |x|^2/2| <= 1.5 MAX_NORM^2 for vectors within the norm bound; a ciphertext
        # of another key, repository or version decrypts to values near the modulus (~2^60
        # / 2^40): refused, never ranked.
        if scores.size and not np.abs(scores).max() <= SCORE_LIMIT:
            raise FormatError("the CKKS scores do not decrypt under this repository's key "
                              "version: the query or a block belongs to another repository "
                              "or key version")
        return scores

    def evaluation_keys_work(self, evaluation_keys: bytes, period: int) -> bool:
        """Whether public evaluation keys compute correctly under this secret key: the
        check a client makes before it lets a service score with them (SECURITY.md 4.2,
        "Who can write the evaluation keys"). Anyone holding the key version's data key
        can write the keys object; keys of another secret key, or the right ones with an
        added error, make an honest service return scores that decrypt in range but wrong.

        What is run is what the service runs (``CkksEvaluator`` on the keys as stored): the
        rows layout's ``score_rows`` at the repository's period on fresh encryptions of
        random values in every slot (one ciphertext product, relinearisation, the
        rotations by 1, 2, ..., period/2, the added norms, the rescale: every key the
        service uses), and one rotation by one slot of a fresh encryption (the diagonal
        layout's query rotation). Every slot is compared with the plaintext result.

        Why a test on random inputs is sound. A key-switching key is a set of encryptions
        under the secret key s, one per RNS digit j; a forged one is a valid key plus a
        deviation D_j (any polynomials). Switching a ciphertext component c adds
        E = sum_j d_j * D_j / P to the result, where d_j are the digits of c: E is linear in
        the digits and does not depend on the plaintexts. The component switched is always
        pseudo-uniform: the uniform ``a`` of the client's fresh symmetric encryption (of the
        query, and of the blocks its writers encrypted), its rotations, or products of
        two such. So E has the same distribution here as on every real query, drawn from
        randomness the forger never saw. Keys of another secret key make D_j uniform and E
        uniform modulo q: every slot fails. A small D_j (the right keys plus an error)
        gives a near-Gaussian E in each slot; the test bounds its RMS over 4,096 slots
        (an estimate of its standard deviation within a few per cent) and its maximum, at
        17 to 4,000 times the honest keys' worst measured values (``EVAL_CHECK_*``).
        What passes adds at most 1e-6 RMS to a rows score and 1e-7 RMS per query rotation;
        a diagonal score carries up to ``period`` - 1 chained rotations weighted by a
        block coordinate, at most sqrt(period) * MAX_NORM * 1e-7 ~ 4e-4 RMS at period
        4,096, under ``ERROR_BOUND`` (1e-2) by more than 20 standard deviations: the
        client's exact re-scoring still sees the true top-k. (A block written with
        crafted ``a`` parts is another attack: its writer's signed log entry names it.)

        Cost at period 128: about 40 ms, no I/O (the keys are already downloaded).
        Keys that do not even load, or lack a rotation the service uses, do not work."""
        seal = _seal()
        rng = np.random.default_rng(int.from_bytes(os.urandom(8), "big"))
        u, v, half = (rng.uniform(-1.0, 1.0, SLOTS) for _ in range(3))
        try:
            evaluator = CkksEvaluator(evaluation_keys)

            def fresh(values: F64, scale: float) -> Any:
                return _load(seal.Ciphertext, evaluator.context, self._encrypt(values, scale),
                             "a test ciphertext")

            first = fresh(u, SCALE)
            rows = evaluator.score_rows(first, fresh(v, SCALE), fresh(half, SCALE * SCALE),
                                        period)
            turned = evaluator.rotations(first, 2)[1]
            got_rows, got_turned = self._decrypt(_save(rows)), self._decrypt(_save(turned))
        except (FormatError, ValueError, RuntimeError):
            return False  # SEAL refuses keys that do not fit the parameters or lack a key
        want = u * v
        step = 1
        while step < period:  # the window sums score_rows computes, in every slot
            want = want + np.roll(want, -step)
            step *= 2
        return (_within(got_rows - want - half, EVAL_CHECK_RMS_ROWS, EVAL_CHECK_MAX_ROWS)
                and _within(got_turned - np.roll(u, -1), EVAL_CHECK_RMS_ROTATION,
                            EVAL_CHECK_MAX_ROTATION))


# Bounds of the evaluation-keys check (CkksKey.evaluation_keys_work). Honest keys, measured
# over 15 fresh draws at periods 1, 128 and 4,096: rows RMS <= 1.7e-8, max <= 2.3e-8;
# one rotation RMS <= 5.9e-9, max <= 1.4e-7.
EVAL_CHECK_RMS_ROWS, EVAL_CHECK_MAX_ROWS = 1e-6, ERROR_BOUND / 100
EVAL_CHECK_RMS_ROTATION, EVAL_CHECK_MAX_ROTATION = 1e-7, 1e-5


def _within(error: F64, rms: float, largest: float) -> bool:
    """Finite, with RMS and largest absolute value within the bounds (NaN fails)."""
    if not np.isfinite(error).all():
        return False
    return bool(np.sqrt(np.mean(error * error)) <= rms and np.abs(error).max() <= largest)


def layout_for(count: int, period: int) -> str:
    """ROWS for a small block (at most four ciphertexts of vectors: an import batch of 64 at
    d = 128 is 2 + 2 ciphertexts instead of 129), DIAGONAL otherwise.

    Storage alone would favour ROWS up to half a block, but its cost per query is a
    relinearisation and log2(period) rotations per SLOTS/period vectors, and one score
    ciphertext back per SLOTS/period vectors; DIAGONAL costs period cheap products per
    block, shares the query's rotations with every block, and sends back one ciphertext per
    block (measured at n = 10,000: a 1,808-vector block in ROWS took 0.85 s a query and
    7.3 MB of scores; DIAGONAL 0.04 s and 128 KB)."""
    per = SLOTS // period
    return ROWS if -(-count // per) <= 4 else DIAGONAL


Loaded = tuple[int, int, int, list[Any]]  # (kind, period, count, ciphertexts)


class CkksEvaluator:
    """The service's side: no secret key; multiplies and adds ciphertexts it cannot read."""

    def __init__(self, evaluation_keys: bytes) -> None:
        seal = _seal()
        self.context = _context()
        _, _, parts = unpack_parts(evaluation_keys, KIND_EVAL, "the CKKS evaluation keys")
        if len(parts) != 2:
            raise FormatError("the CKKS evaluation keys hold two key sets")
        self._relin = _load(seal.RelinKeys, self.context, parts[0], "the relinearisation keys")
        self._galois = _load(seal.GaloisKeys, self.context, parts[1], "the Galois keys")
        self._evaluator = seal.Evaluator(self.context)

    def load_block(self, block: bytes) -> Loaded:
        """(kind, period, count, ciphertexts) of a stored block, loaded once per segment."""
        seal = _seal()
        kind, _, _ = header(block, "a CKKS block")
        if kind not in (KIND_BLOCK, KIND_ROWS):
            raise FormatError("a CKKS block is not a CKKS object of the expected kind")
        period, count, parts = unpack_parts(block, kind, "a CKKS block")
        want = period + 1 if kind == KIND_BLOCK else 2 * -(-count // (SLOTS // period))
        if len(parts) != want:
            raise FormatError(f"a CKKS block of period {period} and {count} vectors holds "
                              f"{want} ciphertexts, found {len(parts)}")
        return kind, period, count, [_load(seal.Ciphertext, self.context, p, "a CKKS block")
                                     for p in parts]

    def query(self, query: bytes, period: int) -> Any:
        got, _, parts = unpack_parts(query, KIND_QUERY, "the CKKS query")
        if got != period or len(parts) != 1:
            raise FormatError(f"the CKKS query has period {got}, the repository {period}")
        return _load(_seal().Ciphertext, self.context, parts[0], "the CKKS query")

    def rotations(self, first: Any, period: int) -> list[Any]:
        """The query rotated by 0 .. period-1 slots: once per query, shared by every
        diagonal block."""
        out = [first]
        for _ in range(1, period):
            nxt = _seal().Ciphertext()
            self._evaluator.rotate_vector(out[-1], 1, self._galois, nxt)
            out.append(nxt)
        return out

    def score_diagonal(self, rotated: list[Any], block: list[Any]) -> Any:
        """sum_r Q_r * B_r + N, relinearised and rescaled once: one score ciphertext."""
        seal = _seal()
        ev = self._evaluator
        acc = seal.Ciphertext()
        ev.multiply(rotated[0], block[0], acc)
        product = seal.Ciphertext()
        for r in range(1, len(rotated)):
            ev.multiply(rotated[r], block[r], product)
            ev.add_inplace(acc, product)
        ev.relinearize_inplace(acc, self._relin)
        ev.add_inplace(acc, block[-1])  # -|x|^2/2 at the product's scale
        ev.rescale_to_next_inplace(acc)
        return acc

    def score_rows(self, query: Any, data: Any, half: Any, period: int) -> Any:
        """Q * R summed over each window of ``period`` slots (log2 period rotations), plus
        -|x|^2/2 at the window's first slot: a vector's score sits at its window's start."""
        seal = _seal()
        ev = self._evaluator
        acc = seal.Ciphertext()
        ev.multiply(query, data, acc)
        ev.relinearize_inplace(acc, self._relin)
        step = 1
        while step < period:
            turned = seal.Ciphertext()
            ev.rotate_vector(acc, step, self._galois, turned)
            ev.add_inplace(acc, turned)
            step *= 2
        ev.add_inplace(acc, half)
        ev.rescale_to_next_inplace(acc)
        return acc

    def scores(self, query: bytes, blocks: Sequence[Loaded]) -> bytes:
        """Encrypted scores of every block for one query (serialised, block order)."""
        if not blocks:
            return pack_parts(KIND_SCORES, 0, 0, [])
        period = blocks[0][1]
        first = self.query(query, period)
        rotated: list[Any] | None = None
        parts = []
        for kind, got, count, cts in blocks:
            if got != period:
                raise FormatError(f"CKKS blocks of periods {period} and {got} in one index")
            if kind == KIND_BLOCK:
                rotated = rotated or self.rotations(first, period)
                out = [_save(self.score_diagonal(rotated, cts))]
            else:
                out = [_save(self.score_rows(first, cts[i], cts[i + 1], period))
                       for i in range(0, len(cts), 2)]
            parts.append(pack_parts(kind, period, count, out))
        return pack_parts(KIND_SCORES, period, len(parts), parts)


def candidates(scores: F64, k: int, bound: float = ERROR_BOUND) -> NDArray[np.int64]:
    """Rows whose true score may be among the top k: every row within 2 * bound of the k-th
    decrypted score (each decrypted score is within ``bound`` of the true one)."""
    if scores.size == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(k, scores.size)
    kth = np.partition(scores, scores.size - k)[scores.size - k]
    return np.flatnonzero(scores >= kth - 2 * bound).astype(np.int64)


def exact_top_k(features: F64, query: F64, rows: NDArray[np.int64], k: int
                ) -> list[tuple[int, float]]:
    """Re-score the candidate rows exactly (float64 Euclidean distance): (row, distance)."""
    x = np.asarray(features, dtype=np.float64)[rows]
    d2 = np.einsum("ij,ij->i", x - query, x - query)
    order = np.lexsort((rows, d2))[:k]
    return [(int(rows[i]), float(np.sqrt(d2[i]))) for i in order]

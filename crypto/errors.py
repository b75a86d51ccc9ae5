"""Exception types of the cryptographic layer.

One type per failure a caller must treat differently. Messages never contain key
material, plaintext or ciphertext bytes: they may end up in logs and dialogs.
"""


class CryptoError(Exception):
    """Base class of every error raised by ``crypto``."""


class DecryptionError(CryptoError):
    """A ciphertext failed authentication.

    Raised for a wrong key, a flipped bit, a truncated, reordered, extended or moved
    ciphertext alike: telling those apart would help an attacker and not the user.
    """


class FormatError(CryptoError):
    """Serialized key material or an envelope header is malformed or of an unknown version."""

"""The one error type that the imaging package lets out.

Decoding runs on files that users drag in from anywhere, so every failure, whatever library
noticed it, reaches the caller as an :class:`ImageDecodeError` that names the file and says
in plain words what is wrong. The GUI and the CLI show ``str(error)`` as is; callers that need
the library's own exception find it in ``__cause__``.
"""

from __future__ import annotations


class ImageDecodeError(ValueError):
    """A file could not be read as an image.

    Attributes:
        path: the file's path (or the name given for in-memory data), as shown to the user.
        reason: what is wrong, in plain words, e.g. ``"file is empty"``.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read {self.path}: {reason}")

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str, str]]:
        # Exceptions cross process boundaries (worker pools); keep both attributes.
        return (type(self), (self.path, self.reason))

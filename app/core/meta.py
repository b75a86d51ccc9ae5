"""One archived image's decrypted metadata, typed (instead of raw metadata dicts).

The importer writes the metadata object (app/core/importer.py ``_metadata``) as JSON and
encrypts it; readers decrypt it (app/core/searcher.py ``read_meta``) and turn it into an
``ImageMeta`` here, so the CLI's ``ls``/``show``, the GUI's archive and the search hits read
the same fields the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


@dataclass(frozen=True)
class ImageMeta:
    """What the archive knows about one image, decrypted on this workstation.

    ``error`` is set (and the other fields mostly empty) when the metadata of an image the
    index names could not be read or failed its integrity check: a list shows the image as
    damaged rather than failing as a whole.
    """

    image_id: str
    name: str = ""
    imported_at: str = ""  # ISO 8601, UTC, microseconds (seconds in older archives)
    size: int = 0  # bytes of the original
    rows: int = 0
    columns: int = 0
    source_format: str = ""  # "dicom", "png", "jpeg", "tiff"
    tags: dict[str, str] = field(default_factory=dict)  # DICOM keyword -> value
    extractor: str = ""
    sha256: str = ""  # of the original file
    features: tuple[float, ...] = field(default=(), repr=False)
    key_version: int = 0  # the key version that opened the metadata
    error: str = ""
    # The clinical data model (DESIGN.md section 9): DICOM keyword -> value as a string
    # (multi-valued attributes joined by a backslash, as DICOM writes them), from
    # app/imaging/clinical.py CLINICAL_KEYS. Empty for PNG/JPEG/TIFF and older archives.
    clinical: dict[str, str] = field(default_factory=dict)
    frame: int = 0  # 0-based frame of a multi-frame instance this image is
    frames: int = 1  # frames of the instance (NumberOfFrames)
    original_id: str = ""  # image id whose object holds the original file ("" = this one)

    @classmethod
    def from_record(cls, image_id: str, record: dict[str, Any], key_version: int = 0
                    ) -> ImageMeta:
        """From the decrypted metadata JSON object (unknown fields are ignored)."""
        tags = record.get("tags")
        features = record.get("features")
        return cls(
            image_id=image_id, name=str(record.get("name") or image_id[:12]),
            imported_at=str(record.get("imported_at") or ""), size=_int(record.get("size")),
            rows=_int(record.get("rows")), columns=_int(record.get("columns")),
            source_format=str(record.get("source_format") or ""),
            tags={str(k): str(v) for k, v in tags.items()} if isinstance(tags, dict) else {},
            extractor=str(record.get("extractor") or ""),
            sha256=str(record.get("sha256") or ""),
            features=tuple(float(x) for x in features) if isinstance(features, list) else (),
            key_version=key_version,
            clinical=({str(k): str(v) for k, v in clinical.items()}
                      if isinstance(clinical := record.get("clinical"), dict) else {}),
            frame=_int(record.get("frame")), frames=max(1, _int(record.get("frames") or 1)),
            original_id=str(record.get("original") or ""))

    @classmethod
    def damaged(cls, image_id: str, error: str) -> ImageMeta:
        return cls(image_id=image_id, name=image_id[:12], error=error)

    @property
    def modality(self) -> str:
        return self.clinical.get("Modality") or self.tags.get("Modality", "")

    def attribute(self, keyword: str) -> str:
        """A clinical attribute by DICOM keyword, falling back to the older ``tags``."""
        return self.clinical.get(keyword) or self.tags.get(keyword, "")

    @property
    def study_uid(self) -> str:
        return self.clinical.get("StudyInstanceUID", "")

    @property
    def series_uid(self) -> str:
        return self.clinical.get("SeriesInstanceUID", "")

    @property
    def sop_uid(self) -> str:
        return self.clinical.get("SOPInstanceUID", "")

    @property
    def original_image_id(self) -> str:
        """The image id whose stored object is this image's original file."""
        return self.original_id or self.image_id

    def describe(self) -> str:
        """One line: name, size in pixels, format, modality, import time."""
        parts = [self.name]
        if self.rows and self.columns:
            parts.append(f"{self.columns} × {self.rows} pixels")
        if self.source_format:
            parts.append(self.source_format.upper())
        if self.modality:
            parts.append(self.modality)
        if self.imported_at:
            parts.append(f"imported {self.imported_at.replace('T', ' ')[:19]}")
        return " · ".join(parts)

    def as_dict(self, features: bool = False) -> dict[str, Any]:
        """JSON-ready; the feature vector only when asked (it is long)."""
        out: dict[str, Any] = {
            "image_id": self.image_id, "name": self.name, "imported_at": self.imported_at,
            "size": self.size, "rows": self.rows, "columns": self.columns,
            "source_format": self.source_format, "modality": self.modality,
            "tags": dict(self.tags), "extractor": self.extractor, "sha256": self.sha256,
            "key_version": self.key_version, "clinical": dict(self.clinical),
            "frame": self.frame, "frames": self.frames,
            "original_id": self.original_image_id}
        if features:
            out["features"] = list(self.features)
        if self.error:
            out["error"] = self.error
        return out

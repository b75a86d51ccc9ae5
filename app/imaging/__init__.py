"""Decode DICOM/PNG/JPEG/TIFF into float images, and turn images into feature vectors."""

from app.imaging.decode import DecodedImage, decode_bytes, decode_image, sniff_format
from app.imaging.errors import ImageDecodeError
from app.imaging.features import (
    EXTRACTOR_NAME,
    FEATURE_DIM,
    extract_features,
    features_of_file,
    get_extractor,
)
from app.imaging.thumbnail import make_thumbnail_png

__all__ = [
    "EXTRACTOR_NAME",
    "FEATURE_DIM",
    "DecodedImage",
    "ImageDecodeError",
    "decode_bytes",
    "decode_image",
    "extract_features",
    "features_of_file",
    "get_extractor",
    "make_thumbnail_png",
    "sniff_format",
]

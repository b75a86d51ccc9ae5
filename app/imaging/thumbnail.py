"""Preview images: the display image as a small PNG.

Thumbnails are stored encrypted next to each image (DESIGN.md section 3), so the result
list can show pictures without downloading and decoding whole DICOM files.
"""

from __future__ import annotations

import io

from PIL import Image

from app.imaging.decode import DecodedImage


def make_thumbnail_png(img: DecodedImage, max_side: int = 256) -> bytes:
    """PNG bytes of ``img.display()`` with its longer side at most ``max_side`` pixels.

    The aspect ratio is kept and small images are not enlarged (the viewer scales them);
    the default window and MONOCHROME1 inversion apply, as in the viewer.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, not {max_side}")
    pil = Image.fromarray(img.display())
    width, height = pil.size
    scale = max_side / max(width, height)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        pil = pil.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    out = io.BytesIO()
    pil.save(out, format="PNG")
    return out.getvalue()

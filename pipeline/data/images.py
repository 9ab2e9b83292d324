"""Reading and writing image files the way a data owner's folder actually looks.

Any format PIL reads; EXIF orientation applied; grey, palette, 16-bit, RGBA and CMYK images all
become RGB uint8 (transparency composited on white), so marking always sees what a viewer sees.
Corrupt or non-image files raise `ImageError` naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..store import atomic_path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


class ImageError(ValueError):
    """An image file cannot be used; the message names the file."""


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), as paths relative to it, sorted by their text so
    the order is the same on every file system."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder")
    return sorted(
        (p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.as_posix(),
    )


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.rint(array / peak * 255.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img) * 255.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, upright. Images over PIL's decompression-bomb limit
    (`Image.MAX_IMAGE_PIXELS`) are refused from their header, before any pixel is decoded."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return np.asarray(_to_rgb(ImageOps.exif_transpose(img)), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: too large to decode safely ({exc})") from None
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path}: not a readable image ({type(exc).__name__})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: corrupt or truncated image ({exc})") from None


def grid_size(height: int, width: int, max_resolution: int | None) -> tuple[int, int]:
    """(height, width) once the longer side is shrunk to at most `max_resolution`, aspect kept and
    sizes truncated, as FFCV's writer computes them."""
    if max_resolution is None or max(height, width) <= max_resolution:
        return height, width
    ratio = max_resolution / max(height, width)
    return int(height * ratio), int(width * ratio)


def fit_to_grid(image: np.ndarray, max_resolution: int | None) -> np.ndarray:
    """Shrink to `grid_size` as FFCV's writer does before storing (INTER_AREA), so a mark lands on
    the pixels a model is trained on. Idempotent: an image it returns fits already."""
    h, w = grid_size(image.shape[0], image.shape[1], max_resolution)
    if (h, w) == image.shape[:2]:
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Lossless PNG, written atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(tmp, format="PNG")

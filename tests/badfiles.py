"""A corpus of strange inputs (valid and invalid) shared by the data, CLI, app and factory tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _part(size: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    return np.where(r < size * 0.4, 170 + 40 * np.cos(r / 3), 5).astype(np.uint8)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a huge image (decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def invalid_files() -> dict[str, bytes]:
    """name -> bytes of files that must be refused with a clear reason."""
    good_png = _png_bytes(Image.fromarray(_part()))
    jpg = io.BytesIO()
    Image.fromarray(_part()).save(jpg, format="JPEG", quality=90)
    return {
        "empty.png": b"",
        "text.png": b"hello, this is not an image\n",
        "page.png": b"<!doctype html><html><body><script>alert(1)</script></body></html>",
        "truncated.png": good_png[: len(good_png) // 2],
        "truncated.jpg": jpg.getvalue()[: len(jpg.getvalue()) // 2],
        "tiny_1x1.png": _png_bytes(Image.new("L", (1, 1), 128)),
        "thin_3x400.png": _png_bytes(Image.new("L", (3, 400), 128)),
        "vector.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><circle r="20"/></svg>',
        "bomb.png": png_bomb(),
    }


def valid_files() -> dict[str, bytes]:
    """name -> bytes of unusual but valid images that must be judged."""
    part = _part()
    out: dict[str, bytes] = {}
    out["gray.png"] = _png_bytes(Image.fromarray(part))
    out["rgb.png"] = _png_bytes(Image.fromarray(np.stack([part] * 3, -1)))
    rgba = np.dstack([part, part, part, np.full_like(part, 255)])
    out["rgba.png"] = _png_bytes(Image.fromarray(rgba, "RGBA"))
    out["gray16.png"] = _png_bytes(Image.fromarray(part.astype(np.uint16) * 257))
    out["palette.png"] = _png_bytes(Image.fromarray(part).convert("P"))
    for name, fmt, mode in (("cmyk.jpg", "JPEG", "CMYK"), ("part.bmp", "BMP", "RGB"), ("part.tiff", "TIFF", "L")):
        buf = io.BytesIO()
        Image.fromarray(part).convert(mode).save(buf, format=fmt)
        out[name] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    Image.fromarray(part).save(buf, format="JPEG", exif=exif)
    out["exif_rotated.jpg"] = buf.getvalue()
    buf = io.BytesIO()
    frames = [Image.fromarray(part), Image.fromarray(255 - part)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["animated.gif"] = buf.getvalue()
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    out["multipage.tiff"] = buf.getvalue()
    out["wide_200x96.png"] = _png_bytes(Image.fromarray(np.pad(part, ((0, 0), (52, 52)))))
    return out


def write_corpus(folder: Path, valid: bool = True, invalid: bool = True) -> dict[str, Path]:
    """Write the corpus into FOLDER; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {**(valid_files() if valid else {}), **(invalid_files() if invalid else {})}
    paths = {}
    for name, data in files.items():
        p = folder / name
        p.write_bytes(data)
        paths[name] = p
    return paths

"""Image token costs from an image's size, for families whose formula is published.

``image_size`` reads the width and height from the header of an inline PNG, JPEG, GIF or WebP
(base64 or data URL) without decoding the image (a GIF: the bounding size of its screen and every
frame's descriptor, as decoders grow the canvas to fit a frame; a PNG: its IHDR chunks before the
image data, as Pillow reads them; a JPEG: its markers up to the scan, as Pillow and libjpeg read
them). ``image_tokens`` turns a size into the most a
provider charges for it:

* OpenAI tile models (gpt-4o, gpt-4.1, gpt-4.5, o1, o3, gpt-5): ``base + per_tile * tiles``
  after fitting in 2048x2048 and scaling the short side to 768 (85 + 170 a 512px tile;
  gpt-4o-mini 2,833 + 5,667), ``base`` alone at ``detail="low"``. Whether a small image is
  scaled up to 768 is not documented, so both are computed and the larger one is kept.
* OpenAI patch models (gpt-4.1-mini/nano, o4-mini, gpt-5-mini/nano): 32px patches, at most
  1,536, times the model's multiplier (1.62 / 2.46 / 1.72).
* Claude: ``width * height / 750`` for the image as sent (resizing only lowers it), plus 10%
  and 16 tokens: Anthropic calls the formula approximate.

Other families, unreadable headers and images by URL keep the family's worst case.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct

__all__ = ["image_size", "image_tokens"]

_TILES = {"openai-tiles": (85, 170), "gpt-4o-mini": (2_833, 5_667)}
_PATCH_MULTIPLIER = {"openai-mini": 1.62, "openai-nano": 2.46, "o4-mini": 1.72}


def _header_bytes(payload: str, limit_chars: int = 1 << 18) -> bytes | None:
    data = payload.split(",", 1)[1] if payload.startswith("data:") else payload
    head = data[:limit_chars]
    head = head[: len(head) - len(head) % 4]
    try:
        return base64.b64decode(head, validate=False)
    except (binascii.Error, ValueError):
        return None


def _png_size(raw: bytes) -> tuple[int, int] | None:
    """The largest IHDR before the first IDAT: Pillow reads every chunk up to the image data (an
    ancillary chunk ahead of IHDR included) and renders at the last IHDR's size. None when the image
    data does not start within ``raw`` (a later IHDR could not be ruled out)."""
    i, size = 8, None
    while i + 8 <= len(raw):
        (length,) = struct.unpack(">I", raw[i:i + 4])
        kind = raw[i + 4:i + 8]
        if kind == b"IDAT":
            return size
        if kind == b"IHDR":
            if length < 8 or i + 16 > len(raw):
                return None
            found = struct.unpack(">II", raw[i + 8:i + 16])
            size = found if size is None else (max(size[0], found[0]), max(size[1], found[1]))
        i += 12 + length
    return None


def _jpeg_size(raw: bytes) -> tuple[int, int] | None:
    """The frame size a decoder uses: markers are read as Pillow and libjpeg read them (bytes that
    are not a marker skipped, 0xFF fill bytes and stuffed FF00 skipped, segments by their length) up
    to the start of scan; of several SOF markers the largest (Pillow keeps the last). None when the
    scan does not start within ``raw``."""
    i, n, size = 2, len(raw), None
    while i + 1 < n:
        if raw[i] != 0xFF:  # junk between segments
            i = raw.find(b"\xff", i)
            if i < 0:
                return None
            continue
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x00, 0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # stuffed zero, SOI, TEM, RSTn
            i += 2
            continue
        if marker == 0xDA:  # start of scan: the frame is settled
            return size
        if i + 4 > n:
            return None
        (length,) = struct.unpack(">H", raw[i + 2:i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", raw[i + 5:i + 9])
            size = (width, height) if size is None else (max(size[0], width), max(size[1], height))
        i += 2 + length
    return None


_GIF_MAX_FRAMES = 1_024
_GIF_MAX_BLOCKS = 1 << 17  # data sub-blocks walked (at most 255 bytes each): ~33 MB of frames


def _gif_size(payload: str) -> tuple[int, int] | None:
    """A GIF's bounding size: its logical screen and every frame's extent (left + width, top +
    height), as decoders grow the canvas to a frame that overflows the screen. Reads the image
    descriptors only (no decoding), skipping stray bytes between blocks as Pillow does; None when the
    scan gives up (too many frames, sub-blocks or stray bytes), so that the family's worst case is
    used."""
    data = payload.split(",", 1)[1] if payload.startswith("data:") else payload
    try:
        raw = base64.b64decode(data[: len(data) - len(data) % 4], validate=False)
    except (binascii.Error, ValueError):
        return None
    n = len(raw)
    if n < 13:
        return None
    width, height = struct.unpack("<HH", raw[6:10])
    i = 13
    if raw[10] & 0x80:  # global colour table
        i += 3 << ((raw[10] & 7) + 1)
    frames = blocks = 0
    while i < n:
        kind = raw[i]
        if kind == 0x3B:  # trailer
            break
        if kind == 0x2C:  # image descriptor
            if i + 10 > n:
                break
            frames += 1
            if frames > _GIF_MAX_FRAMES:
                return None
            left, top, w, h = struct.unpack("<HHHH", raw[i + 1:i + 9])
            width, height = max(width, left + w), max(height, top + h)
            flags = raw[i + 9]
            i += 10
            if flags & 0x80:  # local colour table
                i += 3 << ((flags & 7) + 1)
            i += 1  # LZW minimum code size
        elif kind == 0x21:  # extension: label, then sub-blocks
            i += 2
        else:  # a stray byte: skipped, as Pillow does
            i += 1
            blocks += 1
            if blocks > _GIF_MAX_BLOCKS:
                return None
            continue
        while i < n:  # data sub-blocks, ended by an empty one
            size = raw[i]
            i += 1 + size
            blocks += 1
            if size == 0:
                break
            if blocks > _GIF_MAX_BLOCKS:
                return None
    return width, height


def image_size(payload: str) -> tuple[int, int] | None:
    """``(width, height)`` of an inline base64 image (or ``data:`` URL), or None if unreadable."""
    raw = _header_bytes(payload)
    if not raw:
        return None
    size: tuple[int, int] | None = None
    if raw.startswith(b"\x89PNG\r\n\x1a\n") and len(raw) >= 24:
        size = _png_size(raw)
    elif raw.startswith(b"\xff\xd8"):
        size = _jpeg_size(raw)
    elif raw[:6] in (b"GIF87a", b"GIF89a") and len(raw) >= 10:
        size = _gif_size(payload)
    elif raw[:4] == b"RIFF" and raw[8:12] == b"WEBP" and len(raw) >= 30:
        kind = raw[12:16]
        if kind == b"VP8X":
            size = (1 + int.from_bytes(raw[24:27], "little"), 1 + int.from_bytes(raw[27:30], "little"))
        elif kind == b"VP8L":
            bits = int.from_bytes(raw[21:25], "little")
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif kind == b"VP8 ":
            w, h = struct.unpack("<HH", raw[26:30])
            size = (w & 0x3FFF, h & 0x3FFF)
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def _tiles(width: int, height: int, upscale: bool) -> int:
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768 or upscale:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    return math.ceil(w / 512) * math.ceil(h / 512)


def image_tokens(family: str, width: int, height: int, low_detail: bool, worst: int, *, bound: bool = True) -> int:
    """The most ``family`` charges for a ``width`` x ``height`` image, never above ``worst``.

    ``worst`` is the family's cap for any image (what is used when the size is unknown).
    ``bound=False``: the likely count instead (a small image is not scaled up).
    """
    if family in _TILES:
        base, per_tile = _TILES[family]
        if low_detail:
            return min(base, worst)
        tiles = _tiles(width, height, False)
        if bound:
            tiles = max(tiles, _tiles(width, height, True))
        return min(base + per_tile * tiles, worst)
    if family in _PATCH_MULTIPLIER:
        patches = min(math.ceil(width / 32) * math.ceil(height / 32), 1536)
        return min(math.ceil(patches * _PATCH_MULTIPLIER[family]) + 1, worst)
    if family == "claude":  # "about (w*h)/750": 10% and 16 tokens on top of the published estimate
        return min(math.ceil(width * height / 750 * 1.1) + 16, worst)
    return worst

"""Images a job is given (an init image, a mask): decoded and checked here, before anything is stored, and
kept as PNG, so that no worker ever decodes what a client sent. Only PNG, JPEG and WebP; sizes read from the
file's header are checked before its pixels are decoded (a decompression bomb is refused at its header);
a file's structure (a PNG's chunks and their CRCs, a JPEG's markers and scans) is walked before Pillow sees
it, so that what costs a decoder time out of proportion to the pixels (a progressive JPEG of thousands of
scans, a flood of empty chunks or markers) is refused first; truncated, corrupt, animated or unusual files
(16-bit, palette, CMYK, grey with alpha, colour-keyed, ...) are refused with the reason or converted to what the
pipeline takes (RGB for the image, 8-bit grey for the mask)."""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from shared.errors import InvalidRequest, PayloadTooLarge

FORMATS = ("PNG", "JPEG", "WEBP")
MIN_SIDE = 8  # a VAE block
_DATA_URL = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
# Structure limits, far above what an encoder writes (libpng writes 8 KiB IDAT chunks: 2,000 for 16 MiB; a
# progressive JPEG has about 10 scans, a few dozen markers): each chunk, marker or scan costs the decoder time
# whatever the pixels (a JPEG scan of 12 bytes is a pass over every block of the image: 100,000 of them, 2 MB,
# took 10 s to decode; 16 MiB of empty PNG chunks or JPEG comments, 5 to 10 s)
MAX_PNG_CHUNKS = 20_000
MAX_JPEG_MARKERS = 4_096
MAX_JPEG_SCANS = 100
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_FILL = re.compile(rb"\xff+")
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # in entropy-coded data: a marker (not stuffing, not RSTn)
# Decoding is bounded by our own pixel limit (checked from the header first); Pillow's own bomb check is
# kept as a second line (raised as an error, not a warning), and truncated files are never "loaded" half
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class Decoded:
    """A checked input: its pixels (RGB for an image, L for a mask) and what it came as."""

    image: Image.Image
    transparent: Image.Image | None  # its alpha had pixels not opaque: L, 255 where transparent (else None)
    source_format: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", compress_level=3)
        return buf.getvalue()


def refuse(field: str, reason: str) -> InvalidRequest:
    """422 invalid_request naming `field` and the reason."""
    return InvalidRequest(f"{field}: {reason}", [{"field": field, "reason": reason}])


def from_base64(field: str, text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 field (optionally a data: URL); 413 past `max_bytes`, 422 if not base64."""
    match = _DATA_URL.match(text)
    body = text[match.end():] if match else text
    if len(body) > -(-max_bytes * 4 // 3) + 4:
        raise PayloadTooLarge(f"{field}: the image is larger than {max_bytes} bytes (SDFLEET_MAX_IMAGE_BYTES)",
                              {"field": field, "max_image_bytes": max_bytes})
    try:
        return base64.b64decode(body.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise refuse(field, "not base64 (nor a data: URL of base64): send the file's bytes in base64, or the "
                             "file itself as a multipart/form-data part") from None


def _check_png(field: str, data: bytes) -> None:
    """A PNG's chunks, walked to IEND: each whole and its CRC right (what libpng refuses), at most
    MAX_PNG_CHUNKS. Pillow's decoder stops when the image is full: a file cut in its last bytes passed."""
    view, pos, chunks = memoryview(data), len(_PNG_SIGNATURE), 0
    while True:
        if pos + 8 > len(data):
            raise refuse(field, f"truncated PNG data: the file ends at byte {len(data)} with no IEND chunk")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        name = ctype.decode("latin-1")
        end = pos + 12 + length
        if end > len(data):
            raise refuse(field, f"truncated PNG data: its {name!r} chunk at byte {pos} runs past the file's end "
                                 f"({len(data)} bytes)")
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            raise refuse(field, f"corrupt PNG data: the CRC of its {name!r} chunk at byte {pos} does not match")
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise refuse(field, f"a PNG of more than {MAX_PNG_CHUNKS} chunks: not what an encoder writes "
                                 f"(refused before decoding)")
        if ctype == b"IEND":
            return
        pos = end


def _check_jpeg(field: str, data: bytes) -> None:
    """A JPEG's markers, walked to its first EOI (an MPO's further images are never decoded): at most
    MAX_JPEG_MARKERS markers and fill bytes, at most MAX_JPEG_SCANS scans. Anything else odd is left to the
    decoder (libjpeg skips stray bytes between markers, as browsers do)."""
    pos, steps, scans = 2, 0, 0
    while pos < len(data):
        steps += 1
        if steps > MAX_JPEG_MARKERS:
            raise refuse(field, f"a JPEG of more than {MAX_JPEG_MARKERS} markers: not what an encoder writes "
                                 f"(refused before decoding)")
        fill = _JPEG_FILL.match(data, pos)
        if fill is None:  # not at a marker: resynchronise at the next 0xFF, as libjpeg does
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return
            continue
        steps += fill.end() - pos - 1  # fill bytes (0xFF repeated): Pillow reads each one in Python
        pos = fill.end()
        if pos >= len(data):
            return
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            return
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length
            continue
        if pos + 2 > len(data):
            return
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            return  # the decoder refuses it
        pos += length
        if marker == 0xDA:  # SOS: its header, then the entropy-coded data up to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise refuse(field, f"a JPEG of more than {MAX_JPEG_SCANS} scans (a progressive JPEG has about "
                                     f"10): refused before decoding, whose time grows with every scan")
            end = _JPEG_SCAN_END.search(data, pos)
            if end is None:
                return
            pos = end.start()


def _check_structure(field: str, data: bytes) -> None:
    if data.startswith(_PNG_SIGNATURE):
        _check_png(field, data)
    elif data.startswith(b"\xff\xd8"):
        _check_jpeg(field, data)


def _to_8bit_grey(im: Image.Image) -> Image.Image:
    """16- and 32-bit grey (mode I;16*, I) scaled to 8 bits: Pillow's own convert clips them at 255."""
    sixteen = im.mode.startswith("I;16")
    im = im.convert("I") if sixteen else im
    top = 65535 if sixteen or (im.getextrema()[1] or 0) > 255 else 255
    return im.point(lambda v: v * (255 / top) + 0.5).convert("L")


# Decodes at once in one API process, at most: each holds a file's pixels (up to SDFLEET_MAX_IMAGE_PIXELS x 4
# bytes, and Pillow's working copies) while it runs; the others wait their turn in the thread pool
DECODING = threading.BoundedSemaphore(2)


def decode(field: str, data: bytes, max_bytes: int, max_pixels: int, role: str = "image") -> Decoded:
    """Check and decode one input file (two at a time per process: DECODING), upright by its EXIF orientation.
    `role` "image" gives RGB; "mask" gives L, where white (255) is repainted: a mask with transparency is read
    by its alpha (transparent: repainted, as OpenAI's masks are), else by its grey level."""
    with DECODING:
        return _decode(field, data, max_bytes, max_pixels, role)


def _decode(field: str, data: bytes, max_bytes: int, max_pixels: int, role: str) -> Decoded:
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{field}: the image is {len(data)} bytes, past {max_bytes} "
                              f"(SDFLEET_MAX_IMAGE_BYTES)", {"field": field, "max_image_bytes": max_bytes})
    if not data:
        raise refuse(field, "empty: no image in it")
    _check_structure(field, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise refuse(field, "not a PNG, JPEG or WebP image (or its header is corrupt)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise refuse(field, f"its header claims more than {max_pixels} pixels") from None
        except Exception as exc:  # a header Pillow could not parse (a text chunk inflating past its limit, ...)
            raise refuse(field, f"its header could not be read ({type(exc).__name__}: {str(exc)[:120]})") from None
        width, height = im.size
        if width * height > max_pixels:
            raise refuse(field, f"{width}x{height} is {width * height} pixels, past the limit of {max_pixels} "
                                 f"(SDFLEET_MAX_IMAGE_PIXELS)")
        if width < MIN_SIDE or height < MIN_SIDE:
            raise refuse(field, f"{width}x{height} is smaller than {MIN_SIDE}x{MIN_SIDE}")
        # an MPO is a JPEG with further images after it (a camera's second view, an Ultra HDR photo's gain
        # map): its first image is the photo, and the only one decoded
        if getattr(im, "n_frames", 1) > 1 and im.format != "MPO":
            raise refuse(field, f"an animated {im.format} ({im.n_frames} frames): send one still image")
        source = "JPEG" if im.format == "MPO" else im.format
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise refuse(field, f"it decodes to more than {max_pixels} pixels") from None
        except Exception as exc:  # truncated, corrupt data, a zlib bomb in a text chunk (ValueError), ...
            raise refuse(field, f"truncated or corrupt {source} data ({type(exc).__name__}: "
                                 f"{str(exc)[:120]})") from None
    if im.size != (width, height):  # a JPEG's draft mode or an EXIF quirk: never trust a changed size
        raise refuse(field, f"decoded to {im.size[0]}x{im.size[1]}, not the {width}x{height} its header says")
    return Decoded(*_normalised(_upright(im), role), source_format=source)


def _upright(im: Image.Image) -> Image.Image:
    """The picture as it is meant to be seen: a camera's EXIF orientation applied (a phone's portrait photo is
    stored sideways with a tag saying so), then dropped. A tag that cannot be read leaves the pixels as they are."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block: the pixels as stored
        return im


def _normalised(im: Image.Image, role: str) -> tuple[Image.Image, Image.Image | None]:
    """(pixels in the mode the role takes, its transparent part if it has one)."""
    alpha = None
    if im.mode == "P" or im.mode == "PA":
        im = im.convert("RGBA")
    elif "transparency" in im.info and im.mode in ("1", "L", "RGB", "I", "I;16", "I;16B", "I;16L"):
        alpha = im.convert("RGBA").getchannel("A")  # a PNG's colour key (tRNS): that colour is transparent
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        im = _to_8bit_grey(im) if im.mode != "F" else im.convert("L")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        alpha = im.getchannel("A")
    transparent = None
    if alpha is not None and alpha.getextrema()[0] < 255:  # (an alpha channel all opaque is no transparency)
        transparent = Image.eval(alpha, lambda a: 255 - a)
    if role == "mask":
        return (transparent if transparent is not None else im.convert("L")), transparent
    return im.convert("RGB"), transparent


def check_pair(image: Decoded, mask: Decoded | None) -> None:
    if mask is not None and mask.size != image.size:
        raise refuse("mask", f"{mask.size[0]}x{mask.size[1]}, not the image's {image.size[0]}x{image.size[1]}: "
                              f"a mask must be the size of its image")


@dataclass(frozen=True)
class Inputs:
    """A job's checked images: the init image and, for inpainting, the mask."""

    image: Decoded
    mask: Decoded | None = None

    def rows(self, job_id: str) -> list[dict]:
        """Their rows of job_inputs (PNG-encoded here, in the request's thread)."""
        return [{"job_id": job_id, "role": role, "width": d.size[0], "height": d.size[1],
                 "source_format": d.source_format, "png": d.png()}
                for role, d in (("image", self.image), ("mask", self.mask)) if d is not None]

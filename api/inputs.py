"""Images a job is given (an init image, a mask): decoded and checked here, before anything is stored, and
kept as PNG, so that no worker ever decodes what a client sent. Only PNG, JPEG and WebP; sizes read from the
file's header are checked before its pixels are decoded (a decompression bomb is refused at its header);
truncated, corrupt, animated or unusual files (16-bit, palette, CMYK, grey with alpha, ...) are refused with
the reason or converted to what the pipeline takes (RGB for the image, 8-bit grey for the mask)."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, UnidentifiedImageError

from shared.errors import InvalidRequest, PayloadTooLarge

FORMATS = ("PNG", "JPEG", "WEBP")
MIN_SIDE = 8  # a VAE block
_DATA_URL = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
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


def _refuse(field: str, reason: str) -> InvalidRequest:
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
        raise _refuse(field, "not base64 (nor a data: URL of base64): send the file's bytes in base64, or the "
                             "file itself as a multipart/form-data part") from None


def _to_8bit_grey(im: Image.Image) -> Image.Image:
    """16- and 32-bit grey (mode I;16*, I) scaled to 8 bits: Pillow's own convert clips them at 255."""
    sixteen = im.mode.startswith("I;16")
    im = im.convert("I") if sixteen else im
    top = 65535 if sixteen or (im.getextrema()[1] or 0) > 255 else 255
    return im.point(lambda v: v * (255 / top) + 0.5).convert("L")


def decode(field: str, data: bytes, max_bytes: int, max_pixels: int, role: str = "image") -> Decoded:
    """Check and decode one input file. `role` "image" gives RGB; "mask" gives L, where white (255) is
    repainted: a mask with transparency is read by its alpha (transparent: repainted, as OpenAI's masks
    are), else by its grey level."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{field}: the image is {len(data)} bytes, past {max_bytes} "
                              f"(SDFLEET_MAX_IMAGE_BYTES)", {"field": field, "max_image_bytes": max_bytes})
    if not data:
        raise _refuse(field, "empty: no image in it")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise _refuse(field, "not a PNG, JPEG or WebP image (or its header is corrupt)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _refuse(field, f"its header claims more than {max_pixels} pixels") from None
        except Exception as exc:  # a header Pillow could not parse
            raise _refuse(field, f"its header could not be read ({type(exc).__name__})") from None
        width, height = im.size
        if width * height > max_pixels:
            raise _refuse(field, f"{width}x{height} is {width * height} pixels, past the limit of {max_pixels} "
                                 f"(SDFLEET_MAX_IMAGE_PIXELS)")
        if width < MIN_SIDE or height < MIN_SIDE:
            raise _refuse(field, f"{width}x{height} is smaller than {MIN_SIDE}x{MIN_SIDE}")
        if getattr(im, "n_frames", 1) > 1:
            raise _refuse(field, f"an animated {im.format} ({im.n_frames} frames): send one still image")
        source = im.format
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _refuse(field, f"it decodes to more than {max_pixels} pixels") from None
        except Exception as exc:  # truncated, corrupt data, a zlib bomb in a text chunk (ValueError), ...
            raise _refuse(field, f"truncated or corrupt {source} data ({type(exc).__name__}: "
                                 f"{str(exc)[:120]})") from None
    if im.size != (width, height):  # a JPEG's draft mode or an EXIF quirk: never trust a changed size
        raise _refuse(field, f"decoded to {im.size[0]}x{im.size[1]}, not the {width}x{height} its header says")
    return Decoded(*_normalised(im, role), source_format=source)


def _normalised(im: Image.Image, role: str) -> tuple[Image.Image, Image.Image | None]:
    """(pixels in the mode the role takes, its transparent part if it has one)."""
    if im.mode == "P" or im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        im = _to_8bit_grey(im) if im.mode != "F" else im.convert("L")
    transparent = None
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        alpha = im.getchannel("A")
        if alpha.getextrema()[0] < 255:  # (an alpha channel all opaque is no transparency)
            transparent = Image.eval(alpha, lambda a: 255 - a)
    if role == "mask":
        return (transparent if transparent is not None else im.convert("L")), transparent
    return im.convert("RGB"), transparent


def check_pair(image: Decoded, mask: Decoded | None) -> None:
    if mask is not None and mask.size != image.size:
        raise _refuse("mask", f"{mask.size[0]}x{mask.size[1]}, not the image's {image.size[0]}x{image.size[1]}: "
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

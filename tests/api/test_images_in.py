"""Images a job is given, sent as an attacker would: malformed, truncated, not images, decompression bombs,
formats not taken, animations, files that cost a decoder time out of proportion (thousands of JPEG scans, a
flood of PNG chunks), bad base64, bodies past the limit. Each is refused with a 4xx whose reason names the
field, on POST /v1/jobs (JSON base64 and multipart) and POST /v1/images/edits (OpenAI's shape), and nothing is
stored (jobs and job_inputs counted, on SQLite and PostgreSQL). Unusual but valid files (16-bit, palette with
transparency, CMYK, grey with alpha, 1-bit, colour-keyed, MPO) are taken and stored normalised. In-process
against an API whose fake worker takes image jobs (nobody runs them)."""

from __future__ import annotations

import base64
import functools
import io
import struct
import zipfile
import zlib

import pytest
from PIL import Image
from sqlalchemy import func, select

from api import inputs
from shared.models import JobInput
from tests.helpers import IMAGE_DEFAULTS, assert_error_shape, count, make_api
from tests.helpers import database_url, db  # noqa: F401 (fixtures)

MAX_IMAGE_BYTES = 1 << 20  # small, so that bodies past the limits are cheap to send


@pytest.fixture(scope="module")
def client(database_url, redis_url):
    from shared.db import engine_for, migrate

    migrate(engine_for(database_url))
    with make_api(database_url, redis_url, IMAGE_DEFAULTS, max_image_bytes=MAX_IMAGE_BYTES, worker_stale_s=3600,
                  heartbeat_s=5, images_wait_s=0.05) as api:
        yield api


def stored(db) -> tuple[int, int]:
    with db() as s:
        return count(db), s.scalar(select(func.count()).select_from(JobInput))


# --- files -------------------------------------------------------------------------------------------------

def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def png_raw(width: int, height: int, idat: bytes, depth: int = 8, colour: int = 2, extra: bytes = b"") -> bytes:
    """A PNG written chunk by chunk: its header says what the test wants, whatever its data holds."""
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


RGB = Image.new("RGB", (64, 64), (200, 40, 10))
NOISE = Image.effect_noise((64, 64), 60).convert("RGB")
ROWS = zlib.compress(b"".join(b"\0" + b"\x10" * 192 for _ in range(64)))  # 64x64 RGB rows, filter 0


@functools.cache
def png() -> bytes:
    return encode(NOISE, "PNG")


@functools.cache
def jpeg(**kw) -> bytes:
    return encode(NOISE, "JPEG", **kw)


def with_sof(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) claims another size."""
    out = bytearray(data)
    at = out.find(b"\xff\xc0")
    out[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def webp_claiming(side: int) -> bytes:
    """A lossless WebP whose VP8L header claims side x side."""
    out = bytearray(encode(RGB, "WEBP", lossless=True))
    at = out.find(b"VP8L") + 9
    bits = int.from_bytes(out[at:at + 4], "little")
    out[at:at + 4] = ((side - 1) | ((side - 1) << 14) | (bits & 0xF0000000)).to_bytes(4, "little")
    return bytes(out)


def jpeg_scans(extra: int) -> bytes:
    """A progressive JPEG with `extra` more copies of its smallest scan: each a pass over the image's blocks."""
    data = jpeg(progressive=True)
    at, scans = 2, []
    while data[at + 1] != 0xD9:
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        end = at + 2 + length
        if data[at + 1] == 0xDA:
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
            scans.append(data[at:end])
        at = end
    return data[:at] + min(scans[1:], key=len) * extra + data[at:]


def zipped() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "a")
    return buf.getvalue()


def two_frames(fmt: str) -> bytes:
    return encode(RGB, fmt, save_all=True, append_images=[Image.new("RGB", (64, 64), (0, 0, 255))])


# (name, file, what the reason says): each refused as the image, and as the mask of a good image
HOSTILE = [
    ("png-truncated", lambda: png()[:len(png()) // 2], "truncated"),
    ("png-trailer-cut", lambda: png()[:-10], "truncated"),  # every pixel there, no IEND: Pillow took it
    ("png-bad-crc", lambda: png()[:-20] + bytes([png()[-20] ^ 1]) + png()[-19:], "CRC"),
    ("jpeg-truncated", lambda: jpeg()[:len(jpeg()) // 2], "truncated or corrupt"),
    ("jpeg-progressive-truncated", lambda: jpeg(progressive=True)[:len(jpeg(progressive=True)) * 2 // 3],
     "truncated or corrupt"),
    ("webp-truncated", lambda: encode(NOISE, "WEBP")[:len(encode(NOISE, "WEBP")) // 2], "header could not be read"),
    ("text", lambda: b"just some text, no image\n", "not a PNG, JPEG or WebP"),
    ("pdf", lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not a PNG, JPEG or WebP"),
    ("zip", zipped, "not a PNG, JPEG or WebP"),
    ("html-as-png", lambda: b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>", "PNG"),
    ("png-bomb-100000x100000", lambda: png_raw(100000, 100000, zlib.compress(b"\0" * 100)), "pixels"),
    ("png-bomb-2^31", lambda: png_raw(2**31 - 1, 2**31 - 1, zlib.compress(b"")), "pixels"),
    ("png-in-limits-short-data", lambda: png_raw(2000, 2000, zlib.compress(b"\0" * 100)), "truncated"),
    ("png-ztxt-bomb", lambda: png_raw(64, 64, ROWS, extra=chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * (8 << 20)))),
     "header could not be read"),
    ("png-chunk-flood", lambda: png_raw(64, 64, ROWS, extra=chunk(b"abCd", b"") * (inputs.MAX_PNG_CHUNKS + 1)),
     "chunks"),
    ("jpeg-sof-65000x65000", lambda: with_sof(jpeg(), 65000, 65000), "pixels"),
    ("jpeg-sof-zero-height", lambda: with_sof(jpeg(), 64, 0), "not a PNG, JPEG or WebP"),
    ("jpeg-scan-flood", lambda: jpeg_scans(inputs.MAX_JPEG_SCANS), "scans"),
    ("jpeg-comment-flood", lambda: jpeg()[:2] + b"\xff\xfe\x00\x02" * inputs.MAX_JPEG_MARKERS + jpeg()[2:], "markers"),
    ("webp-claims-16383x16383", lambda: webp_claiming(16383), "pixels"),
    ("gif", lambda: encode(RGB, "GIF"), "not a PNG, JPEG or WebP"),
    ("bmp", lambda: encode(RGB, "BMP"), "not a PNG, JPEG or WebP"),
    ("tiff", lambda: encode(RGB, "TIFF"), "not a PNG, JPEG or WebP"),
    ("ico", lambda: encode(RGB, "ICO"), "not a PNG, JPEG or WebP"),
    ("animated-png", lambda: two_frames("PNG"), "animated PNG"),
    ("animated-webp", lambda: two_frames("WEBP"), "animated WEBP"),
    ("4x4", lambda: encode(Image.new("RGB", (4, 4)), "PNG"), "smaller than 8x8"),
    ("zero-length", lambda: b"", "empty"),
]


# --- sending -----------------------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def send(client, how: str, files: dict[str, bytes], **fields):
    """POST the files (by field) and fields: `json` (base64) or `multipart` to /v1/jobs, `edits` (multipart)
    to /v1/images/edits."""
    if how == "json":
        return client.post("/v1/jobs", json={"prompt": "a cat", "steps": 4, **fields,
                                             **{k: b64(v) for k, v in files.items()}})
    parts = {k: (f"{k}.bin", v, "application/octet-stream") for k, v in files.items()}
    text = {k: str(v) for k, v in {"prompt": "a cat", "steps": 4, **fields}.items()}
    return client.post("/v1/jobs" if how == "multipart" else "/v1/images/edits", files=parts, data=text)


def refused(r, how: str, field: str, reason: str, status: int = 422) -> str:
    """The refusal in the route's shape, naming the field; its message."""
    if how == "edits":
        assert r.status_code == (400 if status == 422 else status), r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["param"] == field and r.headers["x-should-retry"] == "false", error
        message = error["message"]
    else:
        error = assert_error_shape(r, status, "invalid_request" if status == 422 else "payload_too_large")
        details = error["details"]
        assert (details[0] if isinstance(details, list) else details)["field"] == field, error
        message = error["message"]
    assert message.startswith(f"{field}: ") and reason in message, message
    return message


HOW = ("json", "multipart", "edits")


@pytest.mark.parametrize("name,make,reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_file_is_refused_naming_its_field_and_nothing_is_stored(client, db, name, make, reason):
    data = make()
    before = stored(db)
    for how in HOW:
        refused(send(client, how, {"image": data}), how, "image", reason)
        refused(send(client, how, {"image": png(), "mask": data}), how, "mask", reason)
    assert stored(db) == before


@pytest.mark.parametrize("text,reason", [
    ("not base64!", "not base64"), ("aGVsbG8", "not base64"),  # a character out of the alphabet; bad padding
    ("iVBO\nRw0K", "not base64"), ("\u00e9t\u00e9", "not base64"), ("data:text/plain;base64,aGVsbG8=", "not base64"),
    ("data:image/png;base64,aGVsbG8=", "not a PNG, JPEG or WebP"), ("data:image/png;base64,", "empty"),
])
def test_bad_base64_and_data_urls_are_refused(client, db, text, reason):
    before = stored(db)
    r = client.post("/v1/jobs", json={"prompt": "a cat", "image": text})
    refused(r, "json", "image", reason)
    r = client.post("/v1/images/edits", json={"prompt": "a cat", "image": text})  # (JSON on edits too)
    refused(r, "edits", "image", reason)
    assert stored(db) == before


def test_a_data_url_of_an_image_is_taken(client, db):
    for prefix in ("data:image/png;base64,", "DATA:IMAGE/PNG;BASE64,", "data:image/jpeg;base64,"):
        r = client.post("/v1/jobs", json={"prompt": "a cat", "steps": 4, "image": prefix + b64(png())})
        assert r.status_code == 202, r.text


def test_a_mask_of_another_size_is_refused(client, db):
    before = stored(db)
    small = encode(Image.new("L", (32, 64), 255), "PNG")
    for how in HOW:
        mask = small if how != "edits" else encode(Image.new("LA", (32, 64), (0, 0)), "PNG")
        refused(send(client, how, {"image": png(), "mask": mask}), how, "mask", "32x64, not the image's 64x64")
    assert stored(db) == before


def test_an_upscale_past_4096_a_side_is_refused(client, db):
    before = stored(db)
    wide = encode(Image.new("RGB", (1100, 64)), "PNG")
    for how in ("json", "multipart"):
        refused(send(client, how, {"image": wide}, upscale=4), how, "upscale", "1100x64 enlarged 4x is 4400x256")
    refused(send(client, "json", {"image": encode(Image.new("RGB", (8, 8)), "PNG")}, upscale=2), "json",
            "upscale", "8x8 enlarged 2x is 16x16")
    assert stored(db) == before


def test_an_image_too_narrow_for_a_job_is_refused(client, db):
    before = stored(db)
    for how in HOW:
        tall = encode(Image.new("RGB", (8, 4096)), "PNG")
        refused(send(client, how, {"image": tall}), how, "image", "makes a job of 0x")
    assert stored(db) == before


def test_an_image_past_the_file_limit_is_413_naming_it(client, db):
    before = stored(db)
    big = b"\x89PNG" + b"\0" * MAX_IMAGE_BYTES
    for how in HOW:
        refused(send(client, how, {"image": big}), how, "image", "SDFLEET_MAX_IMAGE_BYTES", status=413)
        refused(send(client, how, {"image": png(), "mask": big}), how, "mask", "SDFLEET_MAX_IMAGE_BYTES", status=413)
    assert stored(db) == before


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/images/edits"])
def test_a_body_past_the_upload_limit_is_413_by_its_length_or_while_read(client, db, path):
    before = stored(db)
    limit = client.app.state.ctx.settings.upload_body_bytes
    boundary = "xyz"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat\r\n--{boundary}\r\n'
            f'Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n').encode()
    body = head + b"\0" * (limit + 1) + f"\r\n--{boundary}--\r\n".encode()
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}

    def chunked():  # no Content-Length: counted while read
        for at in range(0, len(body), 1 << 16):
            yield body[at:at + (1 << 16)]

    for r in (client.post(path, content=body, headers=headers), client.post(path, content=chunked(), headers=headers),
              client.post(path, content=b'{"prompt": "' + b"a" * limit + b'"}',
                          headers={"content-type": "application/json"})):
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "payload_too_large" and str(limit) in error["message"], error
        if path.endswith("/edits"):  # OpenAI's shape there, as every error of the route
            assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        else:
            assert set(error) == {"code", "message", "details"}
    assert stored(db) == before


def test_multipart_oddities_are_refused_with_the_reason(client, db):
    before = stored(db)
    image = ("a.png", png(), "image/png")
    cases = [  # (route, files, data, field, reason)
        ("/v1/jobs", [("image", image), ("image", image)], {"prompt": "a"}, "image", "given twice"),
        ("/v1/jobs", [("image", image), ("prompt", ("p.txt", b"a cat", "text/plain"))], {}, "prompt",
         "a file part where text is expected"),
        ("/v1/jobs", [(f"f{i}", image) for i in range(9)], {"prompt": "a"}, "body", "files"),
        ("/v1/images/edits", [("image[]", image), ("image[]", image)], {"prompt": "a"}, "image", "2 images given"),
        ("/v1/images/edits", [("image", image), ("image", image)], {"prompt": "a"}, "image", "2 images given"),
        ("/v1/images/edits", [("mask", image)], {"prompt": "a"}, "image", "Field required"),
        ("/v1/images/edits", [("image", image)], {}, "prompt", "Field required"),
        ("/v1/images/edits", [("image", image)], {"prompt": "a", "n": "two"}, "n", "valid integer"),
        ("/v1/images/edits", [("image", image)], {"prompt": "a", "size": "64x64\n"}, "size", "WIDTHxHEIGHT"),
        ("/v1/images/edits", [("image", image)], {"prompt": "a", "stream": "true"}, "stream", "Extra inputs"),
        ("/v1/images/edits", [("image", image)], {"prompt": "a", "strength": "nan"}, "strength", "less than"),
        ("/v1/jobs", [("image", image)], {"prompt": "a", "strength": "inf"}, "strength", "less than"),
        ("/v1/jobs", [("image", image)], {"prompt": "a\0b"}, "prompt", "control characters"),
    ]
    for path, files, data, field, reason in cases:
        r = client.post(path, files=files, data=data)
        how = "edits" if path.endswith("edits") else "multipart"
        if field == "body":
            assert r.status_code == 422 and reason in r.json()["error"]["message"], r.text
        else:
            refused(r, how, field, reason)
    for path in ("/v1/jobs", "/v1/images/edits"):
        r = client.post(path, content=b"--x\r\nnot a part", headers={"content-type": "multipart/form-data"})
        assert r.status_code in (400, 422) and "multipart" in r.text, r.text  # no boundary
        r = client.post(path, content=b"a=1", headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code in (400, 422) and "Content-Type" in r.text, r.text
    assert stored(db) == before


def test_json_numbers_a_python_parser_takes_are_refused(client, db):
    before = stored(db)
    for value in (b"NaN", b"Infinity", b"-Infinity", b"1" * 5000):
        r = client.post("/v1/jobs", content=b'{"prompt": "a", "image": "%s", "strength": %s}' % (b64(png()).encode(),
                                                                                           value),
                        headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
    assert stored(db) == before


# --- unusual but valid ---------------------------------------------------------------------------------------

def rows16(width: int, height: int, channels: int) -> bytes:
    sample = b"\x80\x00" * channels * width
    return zlib.compress(b"".join(b"\0" + sample for _ in range(height)))


def palette_with_transparency() -> bytes:
    im = Image.new("P", (96, 64))
    im.putpalette([255, 0, 0, 0, 255, 0])
    im.paste(1, (0, 0, 32, 64))
    return encode(im, "PNG", transparency=1)


def colour_keyed() -> bytes:
    im = Image.new("RGB", (96, 64), (10, 20, 30))
    im.paste((0, 0, 0), (0, 0, 32, 64))
    return encode(im, "PNG", transparency=(0, 0, 0))


def with_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "camera"
    return encode(Image.new("RGB", (96, 64), (1, 2, 3)), "JPEG", exif=exif, icc_profile=b"\0" * 3000)


# (name, file, its size, whether it has transparency)
UNUSUAL = [
    ("16-bit-grey", lambda: encode(Image.new("I;16", (96, 64), 40000), "PNG"), (96, 64), False),
    ("16-bit-rgb", lambda: png_raw(96, 64, rows16(96, 64, 3), depth=16, colour=2), (96, 64), False),
    ("16-bit-rgba", lambda: png_raw(96, 64, rows16(96, 64, 4), depth=16, colour=6), (96, 64), True),
    ("palette-with-transparency", palette_with_transparency, (96, 64), True),
    ("colour-keyed-rgb", colour_keyed, (96, 64), True),
    ("cmyk-jpeg", lambda: encode(Image.new("CMYK", (96, 64), (0, 200, 200, 0)), "JPEG"), (96, 64), False),
    ("grey-alpha", lambda: encode(Image.new("LA", (96, 64), (100, 0)), "PNG"), (96, 64), True),
    ("1-bit", lambda: encode(Image.new("1", (96, 64), 1), "PNG"), (96, 64), False),
    ("progressive-jpeg", lambda: encode(NOISE.resize((96, 64)), "JPEG", progressive=True), (96, 64), False),
    ("jpeg-with-exif-and-icc", with_exif, (96, 64), False),
    ("mpo", lambda: encode(Image.new("RGB", (96, 64), (9, 9, 9)), "MPO", save_all=True,
                           append_images=[Image.new("RGB", (32, 32))]), (96, 64), False),
    ("webp-lossless-alpha", lambda: encode(Image.new("RGBA", (96, 64), (1, 2, 3, 0)), "WEBP", lossless=True),
     (96, 64), True),
    ("png-with-data-after-iend", lambda: encode(NOISE.resize((96, 64)), "PNG") + b"trailing junk", (96, 64), False),
]


@pytest.mark.parametrize("name,make,size,transparent", UNUSUAL, ids=[u[0] for u in UNUSUAL])
def test_unusual_but_valid_files_are_taken_and_stored_normalised(client, db, name, make, size, transparent):
    data = make()
    for how in ("json", "multipart"):
        r = send(client, how, {"image": data, "mask": data})
        assert r.status_code == 202, (how, r.text)
        job = r.json()
        assert job["parameters"]["kind"] == "inpaint" and (job["parameters"]["width"], job["parameters"]["height"]) == size
        assert {i["role"]: (i["width"], i["height"]) for i in job["inputs"]} == {"image": size, "mask": size}
        image = Image.open(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/inputs/image.png").content))
        mask = Image.open(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/inputs/mask.png").content))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", size)
        assert (mask.format, mask.mode, mask.size) == ("PNG", "L", size)
        if transparent:  # a mask with transparency is read by it: 255 - alpha (transparent: repainted)
            alpha = Image.open(io.BytesIO(data)).convert("RGBA").getchannel("A")
            assert mask.tobytes() == bytes(255 - a for a in alpha.tobytes())
    # on the edits route: transparency alone makes it inpainting, none image-to-image
    r = send(client, "edits", {"image": data})
    assert r.status_code == 504 and r.json()["error"]["code"] == "job_timeout", r.text  # admitted, never run
    job = client.get(r.headers["location"]).json()
    assert job["parameters"]["kind"] == ("inpaint" if transparent else "img2img")
    assert sorted(i["role"] for i in job["inputs"]) == (["image", "mask"] if transparent else ["image"])


def test_the_edits_route_reads_transparency_as_openai_does(client, db):
    """The mask's transparent pixels are what is edited; a mask without any is refused (on OpenAI's API it
    would edit nothing); an image's own transparency is its mask; a mask wins over the image's."""
    before = stored(db)
    image = encode(Image.new("RGBA", (64, 64), (5, 5, 5, 255)), "PNG")
    opaque = encode(Image.new("RGB", (64, 64), (255, 255, 255)), "PNG")
    refused(send(client, "edits", {"image": image, "mask": opaque}), "edits", "mask", "no transparent pixels")
    assert stored(db) == before
    half = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    half.paste((0, 0, 0, 0), (0, 0, 64, 16))
    r = send(client, "edits", {"image": image, "mask": encode(half, "PNG")}, n=2, size="128x128")
    job = client.get(r.headers["location"]).json()
    p = job["parameters"]
    assert (p["kind"], p["width"], p["height"], p["num_images"], p["strength"]) == ("inpaint", 128, 128, 2, 1.0)
    mask = Image.open(io.BytesIO(client.get(f"/v1/jobs/{job['id']}/inputs/mask.png").content))
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((0, 63)) == 0  # transparent: repainted


@pytest.mark.parametrize("value,reason", [
    (5, "valid string"), ([b64(png())], "valid string"), ({"job_id": "x"}, "valid string"), (None, "needs an image"),
    ({"job_id": "72045503-5ffa-4421-902f-05d8c70b2a63"}, "has no image 0"),
    ({"job_id": "72045503-5ffa-4421-902f-05d8c70b2a63", "index": 8}, "valid string"),
])
def test_an_image_field_of_another_type_is_refused_naming_it(client, db, value, reason):
    before = stored(db)
    field = "mask" if value is None else "image"
    body = {"prompt": "a cat", "image": value} if value is not None else {"prompt": "a cat", "mask": b64(png())}
    refused(client.post("/v1/jobs", json=body), "json", field, reason)
    if value is not None and not isinstance(value, list):  # (a list of one is an edit's image)
        refused(client.post("/v1/images/edits", json=body), "edits", "image", "valid string")
    assert stored(db) == before


def test_a_phone_photo_is_stored_upright_by_its_exif_orientation():
    """A portrait photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    import io

    from PIL import Image

    from api.inputs import decode

    stored = Image.new("RGB", (96, 64), (200, 30, 30))
    stored.paste((30, 30, 200), (0, 0, 48, 64))  # blue on the stored left
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif, quality=95)
    upright = decode("image", buf.getvalue(), 1 << 24, 1 << 22).image
    assert upright.size == (64, 96)
    top, bottom = upright.getpixel((32, 10)), upright.getpixel((32, 85))
    assert top[2] > 150 > top[0] and bottom[0] > 150 > bottom[2]  # the stored left is the viewed top

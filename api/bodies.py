"""Request bodies that may carry images: JSON (images in base64) or multipart/form-data (images as file parts,
the other fields as text parts), read into one pydantic model either way. JSON is validated strictly (no "512"
for 512), as every JSON body of the API is; a form's text parts are read as the types they stand for."""

from __future__ import annotations

import base64
import json
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from shared.errors import InvalidRequest, PayloadTooLarge

M = TypeVar("M", bound=BaseModel)
MAX_FORM_FIELDS = 40


def _errors(exc: ValidationError, model: type[BaseModel]) -> RequestValidationError:
    """Pydantic's errors as FastAPI's, under `body`. A check across fields (a model validator) says which field
    it is about as "field: reason": that field is named as the error's place."""
    out = []
    for e in exc.errors(include_url=False):
        loc = e["loc"]
        name, _, reason = e.get("msg", "").removeprefix("Value error, ").partition(": ")
        if not loc and reason and name in model.model_fields:
            e = {**e, "msg": reason}
            loc = (name,)
        out.append({**e, "loc": ("body", *loc)})
    return RequestValidationError(out)


async def read_model(request: Request, model: type[M], files: tuple[str, ...], max_file_bytes: int,
                     lists: tuple[str, ...] = ()) -> M:
    """The body as `model`. In a multipart body, the parts named in `files` may be files (taken as base64 text,
    as JSON would carry them; each at most `max_file_bytes`, else 413); `lists` are fields that may repeat
    (`image[]` is read as `image`)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        data = await _form(request, files, max_file_bytes, lists)
        strict = False
    elif ctype in ("application/json", "") or ctype.endswith("+json"):
        raw = await request.body()
        try:
            data = json.loads(raw) if raw else None
        except (ValueError, RecursionError) as exc:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error",
                                           "input": {}, "ctx": {"error": str(exc)[:100]}}]) from None
        strict = None
    else:
        raise InvalidRequest(f"body: Content-Type {ctype!r} is not taken: send application/json or "
                             f"multipart/form-data", [{"field": "body", "reason": "unsupported content type"}])
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise _errors(exc, model) from None


async def _form(request: Request, files: tuple[str, ...], max_file_bytes: int, lists: tuple[str, ...]) -> dict:
    try:
        form = await request.form(max_files=8, max_fields=MAX_FORM_FIELDS)
    except MultiPartException as exc:
        raise InvalidRequest(f"body: not a multipart/form-data body this API reads ({exc.message})",
                             [{"field": "body", "reason": exc.message}]) from None
    data: dict = {}
    try:
        for raw_name, value in form.multi_items():
            name = raw_name.removesuffix("[]")
            if isinstance(value, UploadFile):
                if name not in files:
                    raise InvalidRequest(f"{name}: a file part where text is expected (files: {', '.join(files)})",
                                         [{"field": name, "reason": "not a file field"}])
                content = await value.read(max_file_bytes + 1)
                if len(content) > max_file_bytes:
                    raise PayloadTooLarge(f"{name}: the file is larger than {max_file_bytes} bytes "
                                          f"(SDFLEET_MAX_IMAGE_BYTES)", {"field": name, "max_image_bytes": max_file_bytes})
                value = base64.b64encode(content).decode()
            if name in lists:
                data.setdefault(name, []).append(value)
            elif name in data:
                raise InvalidRequest(f"{name}: given twice", [{"field": name, "reason": "given more than once"}])
            else:
                data[name] = value
    finally:
        await form.close()
    return data


def body_schema(model: type[BaseModel], form_files: dict[str, str]) -> dict:
    """The OpenAPI requestBody of a route that takes `model` as JSON or as multipart/form-data (`form_files`:
    the parts that are files, with their descriptions)."""
    json_schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    form = {"type": "object", "properties": {}, "required": []}
    for name, field in model.model_fields.items():
        if name in form_files:
            form["properties"][name] = {"type": "string", "format": "binary", "description": form_files[name]}
            continue
        annotation = field.annotation
        form["properties"][name] = _form_type(annotation, field.description)
        if field.is_required():
            form["required"].append(name)
    if not form["required"]:
        del form["required"]
    return {"required": True, "content": {"application/json": {"schema": json_schema},
                                           "multipart/form-data": {"schema": form}}}


def _form_type(annotation, description: str | None) -> dict:
    text = str(annotation)
    kind = "integer" if "int" in text and "float" not in text else "number" if "float" in text else "string"
    out = {"type": kind}
    if description:
        out["description"] = description
    return out


def components(*models: type[BaseModel]) -> dict:
    """The JSON schemas of `models` (and of the models they use) as OpenAPI components."""
    out = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out

"""Request bodies that may carry images: JSON (images in base64) or multipart/form-data (images as file parts,
the other fields as text parts), read into one pydantic model either way. JSON is validated strictly (no "512"
for 512), as every JSON body of the API is; a form's text parts are read as the types they stand for."""

from __future__ import annotations

import base64
import functools
import json
import re
import typing
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from shared.errors import InvalidRequest, PayloadTooLarge

M = TypeVar("M", bound=BaseModel)
MAX_FORM_FIELDS = 40


def _errors(exc: ValidationError, model: type[BaseModel]) -> RequestValidationError:
    """Pydantic's errors as FastAPI's, under `body`. A check across fields (a model validator) says which field
    it is about as "field: reason": that field is named as the error's place."""
    out, seen = [], set()
    for e in exc.errors(include_url=False):
        loc = e["loc"]
        name, _, reason = e.get("msg", "").removeprefix("Value error, ").partition(": ")
        if not loc and reason and name in model.model_fields:
            e = {**e, "msg": reason}
            loc = (name,)
        if len(loc) > 1 and loc[0] in _unions(model):  # ("image", "str"): the field, not pydantic's member tag
            loc = (loc[0], *loc[2:])
        if loc not in seen:
            seen.add(loc)
            out.append({**e, "loc": ("body", *loc)})
    return RequestValidationError(out)


@functools.cache
def _unions(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` that may be one of several types (a base64 text or an earlier job's image), whose
    errors pydantic places under each member's tag ("image.str", "image.ImageRef.job_id")."""
    return frozenset(name for name, field in model.model_fields.items()
                     if len([a for a in typing.get_args(field.annotation) if a is not type(None)]) > 1)


async def read_model(request: Request, model: type[M], files: tuple[str, ...], max_file_bytes: int,
                     lists: tuple[str, ...] = ()) -> M:
    """The body as `model`. In a multipart body, the parts named in `files` may be files (taken as base64 text,
    as JSON would carry them; each at most `max_file_bytes`, else 413); `lists` are fields that may repeat
    (`image[]` is read as `image`)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        data = _literal_ints(model, await _form(request, files, max_file_bytes, lists))
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
    except (MultiPartException, HTTPException) as exc:  # (Starlette raises the first as a 400 inside an app)
        reason = exc.message if isinstance(exc, MultiPartException) else str(exc.detail)
        raise InvalidRequest(f"body: not a multipart/form-data body this API reads ({reason})",
                             [{"field": "body", "reason": reason}]) from None
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


@functools.cache
def _int_choices(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` whose values are a choice of integers (Literal[2, 4])."""
    props = model.model_json_schema()["properties"]
    return frozenset(name for name, prop in props.items()
                     if any("enum" in c and c.get("type") == "integer" for c in prop.get("anyOf", [prop])))


def _literal_ints(model: type[BaseModel], data: dict) -> dict:
    """A form's text for a choice of integers as the integer: pydantic reads "4" as 4 for an int field even in
    lax mode, never for Literal[2, 4] (multipart `upscale=4` was refused with "Input should be 2 or 4")."""
    for name in _int_choices(model) & data.keys():
        if isinstance(data[name], str) and re.fullmatch(r"-?[0-9]{1,6}", data[name]):
            data[name] = int(data[name])
    return data


def body_schema(model: type[BaseModel], form_files: dict[str, str]) -> dict:
    """The OpenAPI requestBody of a route that takes `model` as JSON or as multipart/form-data (`form_files`:
    the parts that are files, with their descriptions; the other parts are text of the field's type, with its
    bounds and choices)."""
    json_schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    properties = model.model_json_schema()["properties"]
    form = {"type": "object", "properties": {}, "required": []}
    for name, field in model.model_fields.items():
        if name in form_files:
            form["properties"][name] = {"type": "string", "format": "binary", "description": form_files[name]}
        else:
            form["properties"][name] = _form_type(properties[name])
        if field.is_required():
            form["required"].append(name)
    if not form["required"]:
        del form["required"]
    return {"required": True, "content": {"application/json": {"schema": json_schema},
                                           "multipart/form-data": {"schema": form}}}


_FORM_KEYS = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
              "maxLength", "pattern", "default")


def _form_type(prop: dict) -> dict:
    """A text part's schema, from the field's JSON schema: its one type that is not null (with its bounds);
    a field of several (a base64 text or an object) is text."""
    choices = [c for c in prop.get("anyOf", [prop]) if c.get("type") != "null"]
    one = choices[0] if len(choices) == 1 and "$ref" not in choices[0] else {"type": "string"}
    out = {k: v for k, v in one.items() if k in _FORM_KEYS and v is not None}
    out.setdefault("type", "string")
    if prop.get("description"):
        out["description"] = prop["description"]
    return out


def components(*models: type[BaseModel]) -> dict:
    """The JSON schemas of `models` (and of the models they use) as OpenAPI components."""
    out = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out

"""An export's source: a local folder or file, or a hub ID resolved to its snapshot in the Hugging Face cache
(modeltools/hub.py); and what a source folder is: OpenVINO IR, or a diffusers pipeline (its components, its
weights' size and precision)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from modeltools import hub
from modeltools.errors import ExportError


def resolve(spec: str | Path, what: str) -> Path:
    """A local folder or file, or a hub ID's snapshot folder in the Hugging Face cache; `what` names the argument
    in the error."""
    if os.path.exists(spec):
        return Path(spec).absolute()
    try:
        return Path(hub.resolve(str(spec)))
    except hub.SourceError as exc:
        raise ExportError(f"{what} {exc}") from None


def is_ir_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() and (path / "unet" / "openvino_model.xml").is_file()


def pipeline_components(src: Path) -> list[str]:
    """The IR components a diffusers pipeline folder converts to; ExportError unless it is a UNet pipeline."""
    try:
        index = json.loads((src / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{src} is not a diffusers pipeline folder (model_index.json: {exc})") from None
    have = [k for k in ("text_encoder", "text_encoder_2") if (index.get(k) or [None])[0]]
    if not (index.get("unet") or [None])[0] or not (index.get("vae") or [None])[0]:
        raise ExportError(f"{src}: only UNet pipelines (SD 1.x/2.x, SDXL, LCM) are exported component by component")
    return have + ["unet", "vae_decoder", "vae_encoder"]


def weight_bytes(src: Path) -> int:
    """The size of a diffusers folder's weights (safetensors and pickled)."""
    return sum(f.stat().st_size for f in src.rglob("*") if f.suffix in (".safetensors", ".bin"))


def is_16bit(src: Path) -> bool:
    """Whether the UNet's safetensors hold fp16/bf16 weights (then it is loaded as such, not upcast to fp32)."""
    for f in sorted((src / "unet").glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        return bool(dtypes) and dtypes <= {"F16", "BF16"}
    return False

"""A LoRA for `sdfleet model export --lora`: its safetensors file (a file, or the one in a folder), and fusing it
into the UNet and the text encoders it has weights for before they are converted, as fastsdcpu does for
LCM-LoRA, so that they convert as plain modules with no extra weights."""

from __future__ import annotations

from pathlib import Path

from modeltools.errors import ExportError


def lora_file(path: Path) -> Path:
    """The LoRA's safetensors file: the path itself, or the one in a folder (diffusers' name first)."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ExportError(f"--lora {path}: not a .safetensors file (pickled weights are not loaded)")
        return path
    found = sorted(path.glob("*.safetensors"))
    named = [f for f in found if f.name == "pytorch_lora_weights.safetensors"]
    if named or len(found) == 1:
        return (named or found)[0]
    raise ExportError(f"--lora {path}: " + (f"holds {len(found)} .safetensors files; name the one to fuse" if found
                                            else "holds no .safetensors file"))


def fuse_lora(pipe, lora: str, scale: float, names: list[str]) -> list[str]:
    """Load the LoRA into those of `names` (UNet, text encoders) it has weights for, fuse it into their weights
    at `scale` and remove its layers, so they convert as plain modules. Returns the components it changed."""
    path = Path(lora)
    state_dict, alphas = pipe.lora_state_dict(str(path.parent), weight_name=path.name)
    if not state_dict or not all("lora" in k for k in state_dict):
        raise ExportError(f"{lora}: not a LoRA (its keys do not name LoRA layers)")
    fused = []
    for name in names:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        if name == "unet":
            pipe.load_lora_into_unet(dict(state_dict), alphas, unet=module, adapter_name="sdfleet", _pipeline=pipe)
        else:
            pipe.load_lora_into_text_encoder(dict(state_dict), alphas, text_encoder=module, prefix=name,
                                             adapter_name="sdfleet", _pipeline=pipe)
        if getattr(module, "peft_config", None):
            fused.append(name)
    if fused:
        pipe.fuse_lora(components=fused, lora_scale=scale, adapter_names=["sdfleet"])
        pipe.unload_lora_weights()
    return fused

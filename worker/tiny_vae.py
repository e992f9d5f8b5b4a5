"""A tiny autoencoder (TAESD / TAESDXL) as OpenVINO IR, for SDFLEET_TINY_VAE: where its decoder is in a folder,
and whether it fits the model's latents. The worker checks it at start; `sdfleet model export-tiny-vae`
writes the layout it reads."""

from __future__ import annotations

import json
from pathlib import Path

from modeltools import hub


class TinyVaeError(ValueError):
    """A folder that holds no tiny autoencoder decoder, with what was expected."""


def tiny_vae_config(folder: Path, missing: str) -> dict:
    """The config.json of a tiny autoencoder in `folder`; TinyVaeError (`missing` says what was expected) when
    there is none, or when it names another class (a full VAE, say)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise TinyVaeError(f"{folder}: {missing} ({exc})") from None
    if config.get("_class_name") != "AutoencoderTiny":
        raise TinyVaeError(f"{folder}: not a tiny autoencoder (its config.json names {config.get('_class_name')!r}, "
                           f"not AutoencoderTiny: madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for SDXL)")
    return config


def tiny_vae_decoder(folder: str | Path) -> Path:
    """The decoder folder of a TAESD / TAESDXL in OpenVINO IR: `folder/vae_decoder` (the layout
    `export_tiny_vae` writes, and fastsdcpu's deinferno/taesd-openvino and rupeshs/taesdxl-openvino), or `folder`
    itself when it holds the decoder. Raises TinyVaeError naming what is missing."""
    folder = Path(folder)
    for cand in (folder / "vae_decoder", folder):
        if (cand / "openvino_model.xml").is_file():
            tiny_vae_config(cand, "a tiny VAE decoder needs its config.json")
            return cand
    raise TinyVaeError(f"{folder}: no TAESD decoder in OpenVINO IR here (expected vae_decoder/openvino_model.xml; "
                       f"`sdfleet model export-tiny-vae` converts a diffusers TAESD such as madebyollin/taesd)")


def tiny_vae_folder(spec: str, latent_channels: int | None = None) -> Path:
    """SDFLEET_TINY_VAE's decoder folder (see tiny_vae_decoder), checked against the number of
    latent channels the model's UNet makes; ValueError with the reason."""
    try:
        folder = tiny_vae_decoder(hub.resolve(spec))
    except (TinyVaeError, hub.SourceError) as exc:
        raise ValueError(f"SDFLEET_TINY_VAE={spec}: {exc}") from None
    channels = json.loads((folder / "config.json").read_text()).get("latent_channels", 4)
    if latent_channels is not None and channels != latent_channels:
        raise ValueError(f"SDFLEET_TINY_VAE={spec}: it decodes {channels}-channel latents; this model's UNet makes "
                         f"{latent_channels}")
    return folder


def model_latent_channels(model_folder: str) -> int | None:
    """The latent channels of an IR folder's UNet (None when its config cannot be read)."""
    try:
        return json.loads((Path(model_folder) / "unet" / "config.json").read_text()).get("out_channels", 4)
    except (OSError, ValueError):
        return None

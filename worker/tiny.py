"""The tiny test model: a random-weight SD 1.x or SDXL pipeline built entirely locally (diffusers components
and a CLIP tokenizer written from a small vocabulary, no hub access), exported to OpenVINO IR with
optimum-intel. Tests and the demo share one cached copy; the loading code is the same as for a real model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when what `build` makes changes: cached copies of another version are rebuilt, not reused.
TINY_VERSION = 1
ARCHES = ("sd", "sdxl")

_WORDS = (
    "a photo of an astronaut riding horse on the moon cat dog red blue green painting portrait landscape "
    "mountain city street night day sky sea tree house car woman man girl boy beautiful detailed high "
    "quality art style oil watercolor digital render fantasy castle forest river sunset lighthouse storm"
).split()


def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: every byte gets a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tokenizer_files(out: Path, max_length: int = 77) -> tuple[int, int, int]:
    """Write a byte-level BPE CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json).

    Every byte is in the vocabulary, so any prompt tokenizes. The special tokens come last: CLIP's legacy
    pooling takes argmax(input_ids) as the end-of-text position. Returns (vocab size, bos id, eos id).
    """
    out.mkdir(parents=True, exist_ok=True)
    base = _byte_alphabet()
    vocab = base + [c + "</w>" for c in base]
    known, merges = set(vocab), []
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            a, b = symbols[0], symbols[1]
            if (a, b) not in known:
                merges.append(f"{a} {b}")
                known.add((a, b))
            if a + b not in known:
                vocab.append(a + b)
                known.add(a + b)
            symbols = [a + b] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {token: i for i, token in enumerate(vocab)}
    (out / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    return len(vocab), ids["<|startoftext|>"], ids["<|endoftext|>"]


def _tokenizer(tmp: Path):
    # transformers 5 ignores CLIPTokenizer(vocab_file=..., merges_file=...): load the folder instead
    from transformers import CLIPTokenizer

    n, bos, eos = write_tokenizer_files(tmp)
    tokenizer = CLIPTokenizer.from_pretrained(tmp)
    if len(tokenizer) != n:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, wrote {n}")
    return tokenizer, bos, eos


def _text_config(bos: int, eos: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, projection_dim=32, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        hidden_act=act, layer_norm_eps=1e-5,
    )


def _vae(**extra):
    from diffusers import AutoencoderKL

    # four blocks: a VAE scale factor of 8, as in the real models (image 512 -> latent 64)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 32, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=128, **extra,
    )


def _scheduler(**extra):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, **extra,
    )


def build_sd(tmp: Path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer, bos, eos = _tokenizer(tmp / "tokenizer-files")
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(bos, eos, "quick_gelu")), tokenizer=tokenizer,
        unet=unet, scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl(tmp: Path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, bos, eos = _tokenizer(tmp / "tokenizer-files")
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        # 6 time ids x addition_time_embed_dim + text encoder 2's projection
        projection_class_embeddings_input_dim=6 * 8 + 32,
        # both encoders' hidden states are concatenated
        cross_attention_dim=32 + 32, norm_num_groups=32,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(force_upcast=False), text_encoder=CLIPTextModel(_text_config(bos, eos, "gelu")),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(bos, eos, "gelu")),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(timestep_spacing="leading"),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def _stamp(arch: str) -> dict:
    from importlib.metadata import version

    libs = ("openvino", "optimum-intel", "diffusers", "transformers")
    return {"sdfleet_tiny": TINY_VERSION, "arch": arch, **{lib: version(lib) for lib in libs}}


STAMP_FILE = "sdfleet_tiny.json"


def is_built(out: Path, arch: str) -> bool:
    try:
        return json.loads((out / STAMP_FILE).read_text()) == _stamp(arch)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # two processes asking for the same model build it once
        yield


def make_tiny(out: Path, arch: str = "sd", seed: int = 0) -> Path:
    """Build and export the tiny model into `out` unless an up-to-date copy is there; returns `out`."""
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    out = Path(out).absolute()
    with _lock(out.with_name(out.name + ".lock")):
        if is_built(out, arch):
            return out
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from optimum.exporters.openvino import main_export
        from optimum.intel import OVConfig

        log.info("building the tiny %s model in %s", arch, out)
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory(prefix="sdfleet-tiny-") as tmp:
            tmp = Path(tmp)
            pipe = (build_sdxl if arch == "sdxl" else build_sd)(tmp)
            pipe.save_pretrained(tmp / "torch")
            staged = tmp / "ir"
            # convert_tokenizer writes tokenizer/openvino_tokenizer.xml, which openvino-genai needs
            main_export(model_name_or_path=str(tmp / "torch"), output=staged, task="text-to-image",
                        library_name="diffusers", ov_config=OVConfig(dtype="fp32"), convert_tokenizer=True)
            (staged / STAMP_FILE).write_text(json.dumps(_stamp(arch)))
            if out.exists():
                shutil.rmtree(out)
            shutil.move(str(staged), out)  # whole folder at once: a crash never leaves half a model
    return out


def default_tiny_dir(cache_dir: Path, arch: str = "sd") -> Path:
    return Path(cache_dir) / "models" / f"tiny-{arch}"

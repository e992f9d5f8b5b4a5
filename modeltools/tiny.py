"""The tiny test models: random-weight pipelines built entirely locally (diffusers components and a CLIP
tokenizer written from a small vocabulary, no hub access), exported to OpenVINO IR with optimum-intel. Tests
and the demo share one cached copy of each; the loading code is the same as for a real model.

Architectures: `sd` (SD 1.5), `sdxl`, and the few-step models CPU users run: `lcm` (a latent consistency
model: UNet with `time_cond_proj_dim`, LCMScheduler, guidance as an embedding), `sd-turbo` (SD 2.x-style:
linear projections, GELU text encoder, Euler with trailing timesteps) and `sdxl-turbo` (SDXL with Euler
ancestral, trailing). The few-step ones are saved as diffusers folders and exported by `sdfleet model
export` (modeltools/export.py), the way a user converts a downloaded model.
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
TINY_VERSION = 2
ARCHES = ("sd", "sdxl", "lcm", "sd-turbo", "sdxl-turbo")
# Exported component by component by `sdfleet model export` (the others in one process, which is quicker)
_BY_EXPORT = ("lcm", "sd-turbo", "sdxl-turbo")
# The UNet's sample_size is only its default latent size (no weight depends on it): 64 latents, so the
# pipelines' default image is 512x512 like SD 1.5's and the turbo models' (x8, the VAE's scale factor).
_SAMPLE_SIZE = 64

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


_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _scheduler(cls: str = "EulerDiscreteScheduler", **extra):
    import diffusers

    return getattr(diffusers, cls)(**_BETAS, steps_offset=1, **extra)


def _sd_unet(**extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=_SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32, **{"attention_head_dim": 8, **extra},
    )


def build_sd(tmp: Path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer, bos, eos = _tokenizer(tmp / "tokenizer-files")
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(bos, eos, "quick_gelu")), tokenizer=tokenizer,
        unet=_sd_unet(), scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_lcm(tmp: Path):
    """A latent consistency model (LCM_Dreamshaper-like): the guidance scale is an embedding the UNet takes
    (`time_cond_proj_dim`), so guidance never doubles the UNet's batch; LCMScheduler, a few steps."""
    from diffusers import LatentConsistencyModelPipeline
    from transformers import CLIPTextModel

    tokenizer, bos, eos = _tokenizer(tmp / "tokenizer-files")
    return LatentConsistencyModelPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(bos, eos, "quick_gelu")), tokenizer=tokenizer,
        unet=_sd_unet(time_cond_proj_dim=32),
        scheduler=_scheduler("LCMScheduler", original_inference_steps=50, timestep_spacing="leading",
                             clip_sample=False, set_alpha_to_one=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sd_turbo(tmp: Path):
    """SD-Turbo-like (SD 2.x architecture: linear projections, per-block heads, a GELU text encoder), with
    Euler on trailing timesteps: one step, no guidance."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer, bos, eos = _tokenizer(tmp / "tokenizer-files")
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(bos, eos, "gelu")), tokenizer=tokenizer,
        unet=_sd_unet(attention_head_dim=(2, 4), use_linear_projection=True),
        scheduler=_scheduler(timestep_spacing="trailing"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sdxl_turbo(tmp: Path):
    """SDXL-Turbo-like: the SDXL architecture with Euler ancestral on trailing timesteps."""
    pipe = build_sdxl(tmp)
    pipe.scheduler = _scheduler("EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
    return pipe


def build_sdxl(tmp: Path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, bos, eos = _tokenizer(tmp / "tokenizer-files")
    unet = UNet2DConditionModel(
        sample_size=_SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
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


BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "lcm": build_lcm, "sd-turbo": build_sd_turbo,
            "sdxl-turbo": build_sdxl_turbo}


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
        with tempfile.TemporaryDirectory(prefix="sdfleet-tiny-", dir=out.parent) as tmp:
            tmp = Path(tmp)
            BUILDERS[arch](tmp).save_pretrained(tmp / "torch")
            staged = tmp / "ir"
            if arch in _BY_EXPORT:
                from modeltools.export import export

                export(tmp / "torch", staged, "fp16", on_step=log.info)
            else:
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


def make_tiny_taesd(out: Path, seed: int = 2) -> Path:
    """A random-weight tiny autoencoder (TAESD's architecture, narrower) saved as a diffusers folder, what
    madebyollin/taesd is for a real model: `sdfleet model export-tiny-vae` converts it. Three upsamplings: the
    VAE scale factor of 8 the tiny pipelines have."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(out)
    return Path(out)


def make_tiny_lora(out: Path, arch: str = "sd", seed: int = 1, rank: int = 4) -> Path:
    """A random-weight LoRA for the tiny `arch` pipeline's UNet (its attention projections), saved as diffusers
    saves one (pytorch_lora_weights.safetensors, PEFT keys): what an LCM-LoRA from the hub is for a real model.
    Its up-projections are random too (a trained LoRA's are; a fresh one's are zero), so it changes the output."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="sdfleet-lora-") as tmp:
        pipe = BUILDERS[arch](Path(tmp))
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    return out

"""Full-size SD 1.5, SDXL and few-step (LCM, SD-Turbo, SDXL-Turbo) architectures with random weights
(memory and time do not depend on the weights' values), built component by component in fp16 so that
building fits a small machine, and saved as a diffusers folder that `sdfleet model export` turns into
OpenVINO IR.

    python bench/fullsize.py build sd15|sdxl|lcm|sd-turbo|sdxl-turbo OUT

The configurations are the published ones (config.json values of runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-xl-base-1.0, SimianLuo/LCM_Dreamshaper_v7: SD 1.5's UNet with
time_cond_proj_dim=256 and the LCMScheduler; stabilityai/sd-turbo: SD 2.1 base's UNet and OpenCLIP-H text
encoder; stabilityai/sdxl-turbo: SDXL at sample size 512 with Euler ancestral, trailing spacing); the
tokenizer is sdfleet's own small byte-level BPE (every id is below 49408, so it fits the full-size
embeddings).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARCHES = ("sd15", "sdxl", "lcm", "sd-turbo", "sdxl-turbo")

_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# arch: (pipeline class, scheduler class, scheduler arguments)
PIPELINES = {
    "sd15": ("StableDiffusionPipeline", "EulerDiscreteScheduler",
             dict(_BETAS, steps_offset=1, timestep_spacing="leading")),
    "sdxl": ("StableDiffusionXLPipeline", "EulerDiscreteScheduler",
             dict(_BETAS, steps_offset=1, timestep_spacing="leading")),
    "lcm": ("LatentConsistencyModelPipeline", "LCMScheduler",
            dict(_BETAS, num_train_timesteps=1000, original_inference_steps=50, set_alpha_to_one=True,
                 steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", clip_sample=False)),
    "sd-turbo": ("StableDiffusionPipeline", "EulerDiscreteScheduler",
                 dict(_BETAS, steps_offset=1, timestep_spacing="trailing")),
    "sdxl-turbo": ("StableDiffusionXLPipeline", "EulerAncestralDiscreteScheduler",
                   dict(_BETAS, steps_offset=1, timestep_spacing="trailing")),
}


def _text_config(bos: int, eos: int, hidden: int, layers: int, heads: int, inter: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                          num_hidden_layers=layers, max_position_embeddings=77, projection_dim=hidden, hidden_act=act,
                          layer_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)


def _vae(sample_size: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                         block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=sample_size,
                         act_fn="silu", down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, **extra)


def _sd_unet(**extra):
    """The SD 1.x/2.x UNet (860M/865M parameters); `extra` sets what differs from SD 1.5."""
    from diffusers import UNet2DConditionModel

    args = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu",
                downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5)
    return UNet2DConditionModel(**{**args, **extra})


def components(arch: str, bos: int, eos: int) -> dict:
    """name -> (library, class name, builder)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if arch in ("sd15", "lcm"):
        # LCM_Dreamshaper_v7: SD 1.5's UNet with the guidance embedding (w) projected into the time embedding
        unet_extra = dict(time_cond_proj_dim=256) if arch == "lcm" else {}
        return {
            "unet": ("diffusers", "UNet2DConditionModel", lambda: _sd_unet(**unet_extra)),
            "text_encoder": ("transformers", "CLIPTextModel",
                             lambda: CLIPTextModel(_text_config(bos, eos, 768, 12, 12, 3072, "quick_gelu"))),
            "vae": ("diffusers", "AutoencoderKL", lambda: _vae(512)),
        }
    if arch == "sd-turbo":
        # SD 2.1 base: linear projections, head dims per block, OpenCLIP ViT-H/14's text tower (23 of 24 layers)
        return {
            "unet": ("diffusers", "UNet2DConditionModel", lambda: _sd_unet(
                attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)),
            "text_encoder": ("transformers", "CLIPTextModel",
                             lambda: CLIPTextModel(_text_config(bos, eos, 1024, 23, 16, 4096, "gelu"))),
            "vae": ("diffusers", "AutoencoderKL", lambda: _vae(512)),
        }
    # sdxl, sdxl-turbo (the same weights' shapes; turbo's configs say 512)
    turbo = arch == "sdxl-turbo"
    return {
        "unet": ("diffusers", "UNet2DConditionModel", lambda: UNet2DConditionModel(
            sample_size=64 if turbo else 128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_embed_type_num_heads=64,
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, act_fn="silu",
            norm_num_groups=32, norm_eps=1e-5, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0)),
        "text_encoder": ("transformers", "CLIPTextModel",
                         lambda: CLIPTextModel(_text_config(bos, eos, 768, 12, 12, 3072, "quick_gelu"))),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection",
                           lambda: CLIPTextModelWithProjection(_text_config(bos, eos, 1280, 32, 20, 5120, "gelu"))),
        "vae": ("diffusers", "AutoencoderKL",
                lambda: _vae(512 if turbo else 1024, scaling_factor=0.13025, force_upcast=True)),
    }


def build(arch: str, out: Path, seed: int = 0) -> None:
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    from modeltools.tiny import write_tokenizer_files

    if arch not in ARCHES:
        raise SystemExit(f"arch must be one of {ARCHES}")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _, bos, eos = write_tokenizer_files(out / "tokenizer-files")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer-files")
    pipeline_cls, scheduler_cls, scheduler_args = PIPELINES[arch]
    index = {"_class_name": pipeline_cls, "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", scheduler_cls], "tokenizer": ["transformers", "CLIPTokenizer"]}
    tokenizer.save_pretrained(out / "tokenizer")
    if pipeline_cls == "StableDiffusionXLPipeline":
        tokenizer.save_pretrained(out / "tokenizer_2")
        index.update(tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True,
                     feature_extractor=[None, None], image_encoder=[None, None])
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False,
                     image_encoder=[None, None])
    getattr(diffusers, scheduler_cls)(**scheduler_args).save_pretrained(out / "scheduler")
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float16)  # built in fp16: half the memory, and what checkpoints ship as
    with torch.no_grad():
        for name, (library, cls, make) in components(arch, bos, eos).items():
            model = make().to(torch.float16)
            model.save_pretrained(out / name, safe_serialization=True)
            index[name] = [library, cls]
            print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
            del model
            gc.collect()
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    print(f"built {arch} in {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "build":
        raise SystemExit(__doc__)
    build(sys.argv[2], Path(sys.argv[3]))

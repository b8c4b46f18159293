"""SDXL base 1.0's architecture from its published configuration, with random weights: what the
benchmark runs on a GPU without downloading 7 GB of weights (speed does not depend on the weights)."""

from __future__ import annotations

UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    addition_embed_type_num_heads=64, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
    scaling_factor=0.13025, force_upcast=True, norm_num_groups=32,
)  # fmt: skip
# CLIP ViT-L/14's text tower and OpenCLIP ViT-bigG/14's (with its projection).
TEXT_ENCODER = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    projection_dim=768,
    hidden_act="quick_gelu",
)
TEXT_ENCODER_2 = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
    hidden_act="gelu",
)


def random_sdxl_pipeline(device: str = "cuda", dtype=None):
    """StableDiffusionXLPipeline of SDXL base 1.0's shapes, weights random, built on `device`.

    The tokenizer is the tiny preset's (byte-level, no merges): token ids differ from the real
    tokenizer's, the compute per prompt (77 tokens) does not.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from synthvlm_assets.models.tiny import tiny_clip_tokenizer

    dtype = dtype or torch.float16
    tokenizer = tiny_clip_tokenizer()
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET).to(dtype)
        vae = AutoencoderKL(**VAE).to(dtype)
        te1 = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER, **common)).to(dtype)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2, **common)).to(dtype)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

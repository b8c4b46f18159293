"""The `tiny` preset: the real architectures at toy sizes with random weights, built offline in
seconds. Outputs are meaningless and labelled as such wherever they appear."""

from __future__ import annotations

TINY_SDXL_IMAGE_SIZE = 32  # pixels; the tiny VAE downsamples by 2


def tiny_clip_tokenizer():
    """A byte-level CLIP tokenizer with no merges (one token per character), built in code."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in sorted(ByteLevel.alphabet()):
            vocab[ch + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_sdxl_pipeline(seed: int = 0):
    """StableDiffusionXLPipeline with both text encoders, the text_time-conditioned UNet and a VAE."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text_config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=32, max_position_embeddings=77,
    )  # fmt: skip
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=TINY_SDXL_IMAGE_SIZE // 2, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=TINY_SDXL_IMAGE_SIZE,
    )  # fmt: skip
    # SDXL base's scheduler configuration (Euler, scaled-linear betas, "leading" spacing).
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_CLIP = "synthvlm-tiny-clip"


def register_tiny_open_clip() -> str:
    """Register a tiny ViT CLIP (224 px, OpenAI preprocessing) with open_clip; returns its name."""
    import json
    import tempfile

    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        cfg = {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        }
        folder = tempfile.mkdtemp(prefix="synthvlm-open-clip-")
        with open(f"{folder}/{TINY_CLIP}.json", "w") as f:
            json.dump(cfg, f)
        open_clip.add_model_config(folder)
    return TINY_CLIP


LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)  # Llama-3-Instruct's chat template
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


def tiny_llama_tokenizer():
    """A byte-level BPE tokenizer with Llama 3's special tokens and chat template, built in code.
    Its only merges spell Yes/No (with and without a leading space, any case) as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    merges = []
    for word in ("Yes", "yes", "YES", "No", "no", "NO"):
        piece = word[0]
        for ch in word[1:]:
            if piece + ch not in vocab:
                merges.append((piece, ch))
                vocab[piece + ch] = len(vocab)
            piece += ch
        merges.append(("\u0120", word))  # Ġ: byte-level's leading space, merged with the whole word
        vocab["\u0120" + word] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>"
    )
    fast.add_special_tokens({"additional_special_tokens": list(LLAMA3_SPECIAL_TOKENS[2:4])})
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast


def tiny_llama(tokenizer, seed: int = 0):
    """LlamaForCausalLM (Llama 3's architecture: GQA, RoPE, SwiGLU) at toy size, random weights.
    Initialised wider than usual (std 0.5) so its meaningless verdicts at least vary by caption."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.5,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert_tokenizer():
    """A lowercase character-level WordPiece (BERT's tokenizer class, as BLIP uses), built in code."""
    import string

    from transformers import BertTokenizer

    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *("##" + p for p in pieces)]
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


TINY_PAIR_IMAGE_SIZE = 64
# The towers of the tiny pair-filter models (BLIP ITM, CLIP): the same toy width and depth for text and vision.
_PAIR_TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_PAIR_VISION = dict(**_PAIR_TOWER, image_size=TINY_PAIR_IMAGE_SIZE, patch_size=16)


def tiny_blip_itm(seed: int = 0):
    """(BlipForImageTextRetrieval, BlipProcessor) at toy size with random weights."""
    import torch
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    torch.manual_seed(seed)
    tokenizer = tiny_bert_tokenizer()
    config = BlipConfig(
        text_config=dict(
            **_PAIR_TOWER,
            vocab_size=len(tokenizer),
            encoder_hidden_size=32,
            bos_token_id=tokenizer.cls_token_id,
            pad_token_id=tokenizer.pad_token_id,
            sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        vision_config=_PAIR_VISION,
        projection_dim=16,
        image_text_hidden_size=16,
    )
    size = {"height": TINY_PAIR_IMAGE_SIZE, "width": TINY_PAIR_IMAGE_SIZE}
    return BlipForImageTextRetrieval(config).eval(), BlipProcessor(
        image_processor=BlipImageProcessor(size=size), tokenizer=tokenizer
    )


def tiny_hf_clip(seed: int = 0):
    """(transformers CLIPModel, CLIPProcessor) at toy size with random weights."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            **_PAIR_TOWER,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=_PAIR_VISION,
        projection_dim=16,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_PAIR_IMAGE_SIZE},
        crop_size={"height": TINY_PAIR_IMAGE_SIZE, "width": TINY_PAIR_IMAGE_SIZE},
    )
    return CLIPModel(config).eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def trained_llama_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE trained here on `corpus`, with Llama 3's special tokens and chat template: real
    merges (so token boundaries can depend on context) without downloading Llama 3's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(LLAMA3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>"
    )
    fast.add_special_tokens({"additional_special_tokens": list(LLAMA3_SPECIAL_TOKENS[2:4])})
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast

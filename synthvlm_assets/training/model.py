"""Assemble a LLaVA-1.5 model (transformers' `LlavaForConditionalGeneration`) from a CLIP vision tower
and a causal LLM, each a Hugging Face id, a local folder or an s3:// prefix, plus a fresh 2-layer GELU
projector (`mlp2x_gelu`). The `tiny` preset builds the same architecture at toy size, offline."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from synthvlm_assets.models.sources import TINY, ModelWeightsError, load_error, resolve_model

IMAGE_TOKEN = "<image>"
DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"
DEFAULT_LLM = "lmsys/vicuna-7b-v1.5"
TINY_IMAGE_SIZE = 32  # pixels; patch 8 gives 16 vision tokens
TINY_REVISION = "tiny-random"


@dataclass(frozen=True)
class ModelSettings:
    """Where the two pretrained parts come from and how the model is put together (SPEC §6)."""

    vision_tower: str = DEFAULT_VISION_TOWER
    vision_revision: str | None = None
    llm: str = DEFAULT_LLM
    llm_revision: str | None = None
    vision_feature_layer: int = -2  # LLaVA-1.5: the penultimate layer
    vision_feature_select_strategy: str = "default"  # drop CLS: 576 patch tokens at 336 px
    seed: int = 0  # the projector's initialisation

    @property
    def tiny(self) -> bool:
        return self.vision_tower == TINY or self.llm == TINY

    @classmethod
    def tiny_preset(cls, seed: int = 0) -> ModelSettings:
        return cls(vision_tower=TINY, llm=TINY, seed=seed)

    def describe(self) -> dict:
        return {
            "vision_tower": self.vision_tower,
            "vision_revision": self.vision_revision or (TINY_REVISION if self.tiny else None),
            "llm": self.llm,
            "llm_revision": self.llm_revision or (TINY_REVISION if self.tiny else None),
            "vision_feature_layer": self.vision_feature_layer,
            "projector": "mlp2x_gelu",
            "seed": self.seed,
        }


def tiny_vicuna_tokenizer(with_image_token: bool = True):
    """A byte-level tokenizer with no merges (one token per byte), Llama 2 / Vicuna's special tokens and (unless
    asked not to, as a plain LLM's tokenizer) `<image>`, built in code. Any text tokenizes; BOS is
    prepended as Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    if with_image_token:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def clip_image_processor(size: int):
    """CLIP's preprocessing (resize shortest edge, centre crop, OpenAI mean/std) at `size` pixels."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _tiny_parts(seed: int, with_image_token: bool = True):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_vicuna_tokenizer(with_image_token)
    vision = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=32)
    )  # fmt: skip
    llm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=2048,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
            tie_word_embeddings=False,
        )
    )
    return vision, clip_image_processor(TINY_IMAGE_SIZE), llm, tokenizer


def _pretrained_parts(settings: ModelSettings, dtype, cache_dir: str | None, s3_endpoint_url: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

    vision_src = resolve_model("vision_tower", settings.vision_tower, cache_dir, s3_endpoint_url)
    llm_src = resolve_model("llm", settings.llm, cache_dir, s3_endpoint_url)
    try:
        # A full CLIP checkpoint (openai/clip-vit-*) holds the vision tower under `vision_model.`: loaded alone.
        vision, info = CLIPVisionModel.from_pretrained(
            vision_src, revision=settings.vision_revision, dtype=dtype, output_loading_info=True
        )
        _no_missing_weights(info)
        image_processor = CLIPImageProcessor.from_pretrained(vision_src, revision=settings.vision_revision)
    except Exception as exc:  # noqa: BLE001 - any loading failure gets the one message naming the setting
        raise load_error("vision_tower", settings.vision_tower, exc) from exc
    try:
        llm, info = AutoModelForCausalLM.from_pretrained(
            llm_src, revision=settings.llm_revision, dtype=dtype, output_loading_info=True
        )
        _no_missing_weights(info)
        tokenizer = AutoTokenizer.from_pretrained(llm_src, revision=settings.llm_revision)
    except Exception as exc:  # noqa: BLE001
        raise load_error("llm", settings.llm, exc) from exc
    return vision, image_processor, llm, tokenizer


def _no_missing_weights(info: dict) -> None:
    """from_pretrained initialises missing weights at random and only warns: a wrong folder must fail."""
    missing = list(info.get("missing_keys", ()))
    if missing:
        raise ValueError(f"{len(missing)} weights missing from the checkpoint, e.g. {sorted(missing)[:3]}")


def build_processor(image_processor, tokenizer, patch_size: int, strategy: str = "default"):
    """transformers' LlavaProcessor: CLIP preprocessing + the tokenizer, `<image>` expanded to the
    vision tokens (patches, plus CLS unless the strategy drops it)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
    )  # fmt: skip


def assemble(vision, image_processor, llm, tokenizer, settings: ModelSettings):
    """LlavaForConditionalGeneration over the given parts (their weights are kept, not copied) with a
    fresh projector; returns (model, processor). `<image>` is added to the tokenizer if missing."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:  # Vicuna has none; LLaVA pads with unk
        tokenizer.pad_token = tokenizer.unk_token
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if llm.get_input_embeddings().num_embeddings < len(tokenizer):
        # New rows drawn around the old ones' mean (never trained in stage 1: image positions take the
        # projected features), seeded: every rank and every resume must build the same model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    vcfg = vision.config
    n_tokens = (vcfg.image_size // vcfg.patch_size) ** 2 + (
        0 if settings.vision_feature_select_strategy == "default" else 1
    )
    config = LlavaConfig(
        vision_config=vcfg.to_dict(), text_config=llm.config.to_dict(), image_token_index=image_token_id,
        image_seq_length=n_tokens, projector_hidden_act="gelu", vision_feature_layer=settings.vision_feature_layer,
        vision_feature_select_strategy=settings.vision_feature_select_strategy, multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )  # fmt: skip
    with torch.device("meta"):  # no memory for weights that are replaced right after
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    # LLaVA builds its mlp2x_gelu projector as plain nn.Linear layers: PyTorch's default initialisation
    # (Kaiming-uniform weights, uniform biases), seeded so every data-parallel rank starts alike.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(
            device=next(llm.parameters()).device, dtype=torch.float32
        )
    processor = build_processor(image_processor, tokenizer, vcfg.patch_size, settings.vision_feature_select_strategy)
    return model, processor


def load_model(settings: ModelSettings, dtype=None, cache_dir: str | None = None, s3_endpoint_url: str | None = None):
    """(model, processor) for the settings: tiny random parts or pretrained weights (ModelWeightsError
    naming the setting when they cannot be loaded)."""
    if settings.tiny:
        if settings.vision_tower != settings.llm:
            raise ModelWeightsError(
                f"the tiny preset needs vision_tower and llm both {TINY!r} (got {settings.vision_tower!r}, "
                f"{settings.llm!r})"
            )
        vision, image_processor, llm, tokenizer = _tiny_parts(settings.seed)
    else:
        vision, image_processor, llm, tokenizer = _pretrained_parts(settings, dtype, cache_dir, s3_endpoint_url)
    return assemble(vision, image_processor, llm, tokenizer, settings)


@contextmanager
def tiny_cpu_threads(settings: ModelSettings):
    """One intra-op thread for the tiny preset on a CPU: its matrices are so small that thread
    hand-offs cost more than they save (and thrash on a shared machine). Restored on exit."""
    import torch

    before = torch.get_num_threads()
    if settings.tiny and not torch.cuda.is_available():
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def transformer_layers(tower) -> list:
    """The transformer blocks of a tower (its `...layers` ModuleList)."""
    import torch

    for name, module in tower.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            return list(module)
    raise ValueError(f"{type(tower).__name__} has no `layers` list")


# The padded lengths a compiled model is fed are rounded up to this (stage 1's collator): a few static
# shapes, each compiled once, at most 15 padding tokens a row. Dynamic-shape graphs (what dynamo makes
# after the second length) ran the 7B stage-1 step at half the eager speed on an H100 (README, Training).
COMPILED_LENGTH_MULTIPLE = 16
# Graphs dynamo keeps per compiled function (all layers share one: the vision layer + one per padded
# width); its default, 8, would send a run's 8th width back to eager.
COMPILED_WIDTHS_LIMIT = 32


def compile_layers(model) -> None:
    """Regional torch.compile: each vision and decoder layer compiled in place (one graph the identical
    layers share: seconds to compile, not minutes), fusing the norms, activations and rotary embeddings
    around the matrix multiplications. Static shapes only (`dynamic=False`: one graph per padded length,
    see COMPILED_LENGTH_MULTIPLE; past COMPILED_WIDTHS_LIMIT a new length runs eagerly). Only `forward`
    is compiled: transformers' output-recording hooks read a ContextVar, which dynamo before torch 2.14
    cannot trace (a graph break in every layer). Raises dynamo's process-wide recompile limit (training
    runs in a process of its own)."""
    import torch

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_WIDTHS_LIMIT)
    for tower in (model.model.vision_tower, model.model.language_model):
        for layer in transformer_layers(tower):
            layer.forward = torch.compile(layer.forward, dynamic=False)


def freeze_all_but_projector(model) -> list:
    """Stage 1: only the projector trains. Returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.model.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def projector_state(model) -> dict:
    """The projector's weights under transformers' names (`linear_1.weight`, ...), on the CPU in fp32."""
    return {
        k: v.detach().float().cpu().contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()
    }


def llava_mm_projector_state(model) -> dict:
    """The projector under the LLaVA repository's names (`model.mm_projector.0.weight`, ...), as its
    `mm_projector.bin` holds them (bf16, as LLaVA saves them)."""
    import torch

    names = {"linear_1": "0", "linear_2": "2"}  # nn.Sequential(Linear, GELU, Linear)
    out = {}
    for k, v in projector_state(model).items():
        layer, param = k.split(".")
        out[f"model.mm_projector.{names[layer]}.{param}"] = v.to(torch.bfloat16)
    return out


def vision_token_count(model) -> int:
    """Vision tokens per image that the model expects (576 for CLIP-L/14 at 336 px, default strategy)."""
    c = model.config
    patches = (c.vision_config.image_size // c.vision_config.patch_size) ** 2
    return patches if c.vision_feature_select_strategy == "default" else patches + 1

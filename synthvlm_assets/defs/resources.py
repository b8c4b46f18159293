"""Configuration lives in resources; the domain code receives plain values."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from synthvlm_assets.captions.filters import PerplexityModel, RuleFilterSettings
from synthvlm_assets.captions.sources import CaptionFields
from synthvlm_assets.shards import ShardRegistry
from synthvlm_assets.storage import StorageRoot

_RULES = RuleFilterSettings()
_FIELDS = CaptionFields()


class StorageResource(ConfigurableResource):
    """The one storage root of every artifact: a local folder or s3://bucket/prefix."""

    root_uri: str = Field(description="Local folder or s3://bucket/prefix holding every artifact.")
    s3_endpoint_url: str | None = Field(default=None, description="Endpoint of an S3-compatible server (SeaweedFS, MinIO).")

    def root(self) -> StorageRoot:
        return StorageRoot(self.root_uri, self.s3_endpoint_url)

    def registry(self) -> ShardRegistry:
        return ShardRegistry(self.root())


class CaptionSourceResource(ConfigurableResource):
    """Where raw caption files arrive, how they are cut into shards and which fields hold what."""

    input_uri: str = Field(description="Folder (local or s3://) the sensor watches for new caption files.")
    shard_rows: int = Field(default=1000, description="Rows per shard (a 100M pool wants larger shards).")
    id_field: str = _FIELDS.id
    caption_field: str = _FIELDS.caption
    source_field: str = _FIELDS.source
    image_fields: list[str] = list(_FIELDS.image)
    max_caption_chars: int = Field(default=_FIELDS.max_caption_chars, description="Longer captions are malformed rows.")

    def fields(self) -> CaptionFields:
        return CaptionFields(
            id=self.id_field,
            caption=self.caption_field,
            image=tuple(self.image_fields),
            source=self.source_field,
            max_caption_chars=self.max_caption_chars,
        )


class CurationResource(ConfigurableResource):
    """Thresholds of the paper's Table 1 (appendix); keep when min <= stat <= max."""

    alphanumeric_ratio_min: float = _RULES.alphanumeric_ratio_min
    character_repetition_n: int = _RULES.character_repetition_n
    character_repetition_ratio_max: float = _RULES.character_repetition_ratio_max
    flagged_word_ratio_max: float = _RULES.flagged_word_ratio_max
    flagged_words_lang: str = _RULES.flagged_words_lang
    perplexity_max: float = _RULES.perplexity_max
    kenlm_model_path: str | None = Field(default=None, description="KenLM model; perplexity is skipped (and recorded so) when unset.")
    sentencepiece_model_path: str | None = None
    special_character_ratio_min: float = _RULES.special_character_ratio_min
    special_character_ratio_max: float = _RULES.special_character_ratio_max
    word_repetition_n: int = _RULES.word_repetition_n
    word_repetition_ratio_max: float = _RULES.word_repetition_ratio_max

    def settings(self) -> RuleFilterSettings:
        return RuleFilterSettings(**self.model_dump())

    def perplexity_model(self) -> PerplexityModel | None:
        s = self.settings()
        if not s.perplexity_enabled:
            return None
        if not s.sentencepiece_model_path:
            raise ValueError("kenlm_model_path is set but sentencepiece_model_path is not: the perplexity filter needs both")
        return PerplexityModel(s.kenlm_model_path, s.sentencepiece_model_path)

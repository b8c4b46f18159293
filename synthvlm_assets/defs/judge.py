"""SPEC §1's LLM judge as an asset: judged_captions, one partition per caption shard, on a GPU worker."""

import pyarrow.compute as pc
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from synthvlm_assets.captions.judge.prompt import INSTRUCTION
from synthvlm_assets.captions.judge.stage import (
    ASSET,
    judge_checks,
    judge_shard,
    load_judge,
    timed_rate,
    verdict_counts,
)
from synthvlm_assets.captions.pair_filters import ASSET as PAIR_FILTERED
from synthvlm_assets.captions.pair_filters import PairScorer, pair_filter_checks, pair_filter_shard
from synthvlm_assets.captions.stages import CURATED
from synthvlm_assets.defs.automation import partition_data_version
from synthvlm_assets.defs.metadata import rounded, sample_rows, stats_table, table
from synthvlm_assets.defs.partitions import GPU_TAGS, caption_shards
from synthvlm_assets.defs.resources import JudgeResource, PairFilterResource, StorageResource
from synthvlm_assets.defs.retries import SHARD_RETRY_POLICY, retry_only_transient
from synthvlm_assets.progress import ProgressLog


@asset(
    deps=[CURATED],
    partitions_def=caption_shards,
    retry_policy=SHARD_RETRY_POLICY,
    kinds={"pytorch", "parquet"},
    group_name="captions",
    check_specs=[
        AssetCheckSpec(
            "rows_accounted_for", asset=PAIR_FILTERED, blocking=True, description="Curated = kept + rejected."
        )
    ],
)
@retry_only_transient
def pair_filtered_captions(
    context: AssetExecutionContext, storage: StorageResource, pair_filters: PairFilterResource
) -> MaterializeResult:
    """SPEC §1's optional pair filters on the original web images (BLIP ITM >= 0.8, CLIP cosine >= 0.28).
    Off by default: every curated caption passes through unscored."""
    root = storage.root()
    settings = pair_filters.settings()
    scorer = PairScorer.load(settings, pair_filters.cache_dir, storage.s3_endpoint_url) if settings.enabled else None
    out = pair_filter_shard(root, context.partition_key, settings, scorer, context.run.run_id)
    pairs = out.table
    reasons = pc.value_counts(pairs.column("reject_reason").drop_null()).to_pylist() if pairs.num_rows else []
    metadata = {
        "enabled": settings.enabled,
        "captions_in": pairs.num_rows,
        "kept": out.kept,
        "rejected_by": table(["reason", "captions"], [[r["values"], r["counts"]] for r in reasons]),
    }
    if settings.enabled:
        metadata["models"] = (
            f"{settings.blip_model} (ITM >= {settings.itm_probability_min}), {settings.clip_model} (cos >= "
            f"{settings.clip_cosine_min})"
        )
        metadata["scores"] = stats_table({c: pairs.column(c).to_pylist() for c in ("itm_probability", "clip_cosine")})
        metadata["rejected_sample"] = table(
            ["caption_id", "reason", "detail", "caption"],
            sample_rows(
                pairs.filter(pc.is_valid(pairs.column("reject_reason"))),
                ["caption_id", "reject_reason", "reject_detail", "caption"],
            ),
        )
    return MaterializeResult(
        data_version=partition_data_version(root, out.prefix),
        metadata=rounded(metadata),
        check_results=[
            AssetCheckResult(check_name=name, passed=passed, metadata=seen)
            for name, (passed, seen) in pair_filter_checks(root, out).items()
        ],
    )


def judged_captions_asset(op_tags: dict) -> AssetsDefinition:
    """judged_captions with the op tags of its step (defs/build.py: the GPUs of the judge's settings)."""
    return asset(
        name=ASSET,
        deps=[pair_filtered_captions],
        partitions_def=caption_shards,
        retry_policy=SHARD_RETRY_POLICY,
        kinds={"pytorch", "parquet"},
        group_name="captions",
        pool="gpu",
        op_tags=op_tags,
        check_specs=[
            AssetCheckSpec(
                "every_caption_judged",
                asset=ASSET,
                blocking=True,
                description="One verdict per caption that passed the pair filters.",
            ),
            AssetCheckSpec(
                "only_yes_kept", asset=ASSET, blocking=True, description="Kept captions are exactly the Yes verdicts."
            ),
        ],
    )(retry_only_transient(_judged_captions))


def _judged_captions(
    context: AssetExecutionContext, storage: StorageResource, judge: JudgeResource
) -> MaterializeResult:
    """Captions (curated, past the pair filters) the LLM judge finds fit for image generation (SPEC §1).
    Every caption keeps its verdict (yes / no / parse_failure / unjudgeable), p_yes, raw token, model
    and prompt version."""
    root = storage.root()
    shard = context.partition_key
    settings = judge.settings()
    loaded = load_judge(settings, judge.cache_dir, storage.s3_endpoint_url)
    progress = ProgressLog(context.log.info, f"{ASSET} {shard}", "captions")
    out = judge_shard(root, shard, loaded, settings, context.run.run_id, progress=progress)
    judged = out.judged
    counts = verdict_counts(judged)
    prompts_per_s, tokens_per_s = timed_rate(out.stats)
    columns = ["verdict", "p_yes", "raw_token", "caption"]
    examples = [
        row for v in counts for row in sample_rows(judged.filter(pc.equal(judged.column("verdict"), v)), columns, 3)
    ]
    model = settings.model if not settings.is_tiny else "tiny (random weights: the verdicts are meaningless)"
    backend = settings.resolved_backend()
    metadata = {
        "model": model,
        "revision": judged.column("judge_revision")[0].as_py() if judged.num_rows else "",
        "backend": backend,
        "prompt_version": judged.column("prompt_version")[0].as_py() if judged.num_rows else "",
        "forced_choice": settings.forced_choice,
        **{f"verdict_{k}": n for k, n in counts.items()},
        "kept_fraction": counts["yes"] / judged.num_rows if judged.num_rows else 0.0,
        "judged_now": out.judged_now,
        "cache_hits": out.cache_hits,
        "prompts_per_s": prompts_per_s,
        "tokens_per_s": tokens_per_s,
        "p_yes": stats_table({"p_yes": judged.column("p_yes").to_pylist()}),
        "examples": table(["verdict", "p_yes", "raw_token", "caption"], examples),
        "instruction": MetadataValue.text(INSTRUCTION),
        "judged_parquet": MetadataValue.path(root.uri(f"{out.prefix}/judged.parquet")),
    }
    # GPU time only where this process used one (vLLM, or transformers on CUDA); an HTTP judge's is the server's.
    if backend == "vllm" or getattr(loaded.backend, "device", None) == "cuda":
        metadata["gpu_s"] = out.stats.seconds
    return MaterializeResult(
        data_version=partition_data_version(root, out.prefix),
        metadata=rounded(metadata),
        check_results=[
            AssetCheckResult(check_name=name, passed=passed, metadata=seen)
            for name, (passed, seen) in judge_checks(root, out).items()
        ],
    )


judged_captions = judged_captions_asset(GPU_TAGS)

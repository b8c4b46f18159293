"""SPEC §3-§5 as assets: image_scores per shard, then synthvlm_100k over all scored shards."""

import pyarrow.compute as pc
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)

from synthvlm_assets.defs.automation import partition_data_version
from synthvlm_assets.defs.metadata import contact_sheet, histograms, rounded, stats_table, table
from synthvlm_assets.defs.partitions import caption_shards
from synthvlm_assets.defs.retries import SHARD_RETRY_POLICY, retry_only_transient
from synthvlm_assets.defs.resources import ScoringResource, SelectionResource, StorageResource
from synthvlm_assets.defs.partitions import GPU_TAGS
from synthvlm_assets.defs.synthesis import sdxl_images
from synthvlm_assets.formats.dataset import ASSET as DATASET
from synthvlm_assets.formats.dataset import PAPER_TABLE_4
from synthvlm_assets.formats.dataset import synthvlm_100k as publish_synthvlm_100k
from synthvlm_assets.formats.llava import image_path
from synthvlm_assets.progress import ProgressLog
from synthvlm_assets.scoring.clip_score import ClipScorer
from synthvlm_assets.scoring.stage import ASSET as SCORES
from synthvlm_assets.scoring.stage import score_shard


@asset(
    deps=[sdxl_images],
    partitions_def=caption_shards,
    retry_policy=SHARD_RETRY_POLICY,
    kinds={"pytorch", "parquet"},
    group_name="synthesis",  # per shard, on the GPU, one row per image: beside the images it scores
    pool="gpu",
    op_tags=GPU_TAGS,
    check_specs=[
        AssetCheckSpec(
            "scores_in_range", asset=SCORES, blocking=True, description="0 <= clip_score <= 1 and -1 <= ssim <= 1."
        ),
        AssetCheckSpec(
            "one_row_per_image", asset=SCORES, blocking=True, description="Every usable image scored once."
        ),
    ],
)
@retry_only_transient
def image_scores(
    context: AssetExecutionContext, storage: StorageResource, scoring: ScoringResource, selection: SelectionResource
) -> MaterializeResult:
    """CLIPScore ("A photo depicts " + caption, max(cos, 0)) and SSIM (768 px vs its 336-px round trip)
    of every usable image of the shard, and score = clip_score + lambda * ssim."""
    root = storage.root()
    scorer = ClipScorer.load(scoring.clip_settings(), scoring.cache_dir, storage.s3_endpoint_url)
    result = score_shard(
        root,
        context.partition_key,
        scorer,
        scoring.ssim_settings(),
        selection.lam,
        scoring.worker_count(),
        context.run.run_id,
        progress=ProgressLog(context.log.info, f"{SCORES} {context.partition_key}", "images"),
    )
    t = result.scores
    return MaterializeResult(
        data_version=partition_data_version(root, result.prefix),
        metadata=rounded(
            {
                "clip_model": f"{scoring.clip_model}/{scoring.clip_pretrained}"
                + (" (tiny: random weights)" if scoring.clip_model == "tiny" else ""),
                "images_scored": t.num_rows,
                "images_per_s": result.images_per_second,
                "mean_clip_score": pc.mean(t.column("clip_score")).as_py() if t.num_rows else 0.0,
                "mean_ssim": pc.mean(t.column("ssim")).as_py() if t.num_rows else 0.0,
                "scores": stats_table({c: t.column(c).to_pylist() for c in ("clip_score", "ssim", "score")}),
                "scores_parquet": MetadataValue.path(root.uri(f"{result.prefix}/scores.parquet")),
            }
        ),
        check_results=[AssetCheckResult(check_name=name, passed=ok) for name, ok in result.checks.items()],
    )


@asset(
    deps=[image_scores],
    kinds={"duckdb", "json", "webdataset", "parquet"},
    group_name="selection",
    check_specs=[
        AssetCheckSpec("selected_count", asset=DATASET, blocking=True, description="min(K, captions scored) records."),
        AssetCheckSpec(
            "selected_images_readable",
            asset=DATASET,
            blocking=True,
            description="Every selected image exists and decodes.",
        ),
    ],
)
def synthvlm_100k(
    context: AssetExecutionContext, storage: StorageResource, selection: SelectionResource
) -> MaterializeResult:
    """The global top K over every scored shard (best candidate per caption), as LLaVA JSON + images,
    WebDataset shards, Hugging Face Parquet and a dataset card."""
    root = storage.root()
    out = publish_synthvlm_100k(root, selection.settings(), context.run.run_id)
    rows, selected, scores, base = out.rows, out.selected, out.scores, out.manifest["prefix"]
    threshold = rows[-1]["score"] if rows else None
    sheet_rows = rows[:8] + rows[-8:] if len(rows) > 16 else rows
    means = [
        ["selected (this run)", *(pc.mean(selected.column(c)).as_py() for c in ("clip_score", "ssim", "score"))],
        ["all candidates (this run)", *(pc.mean(scores.column(c)).as_py() for c in ("clip_score", "ssim", "score"))],
    ]
    means += [[name, c, s, w] for name, (c, s, w) in PAPER_TABLE_4.items()]  # w: None where the paper has none
    return MaterializeResult(
        data_version=DataVersion(out.manifest["version"]),
        metadata=rounded(
            {
                "records": len(rows),
                "captions_scored": out.captions_scored,
                "threshold": threshold,
                "excluded_shards": len(out.excluded_shards),
                "vs_table_4": table(["set", "CLIPScore", "SSIM", "score"], means),
                # The dataset is where a person looks at plots (markdown: Dagster has no image metadata type).
                "hist_all": histograms(
                    [(c, scores.column(c).to_pylist(), []) for c in ("clip_score", "ssim", "score")], "all candidates"
                ),
                "hist_selected": histograms(
                    [
                        (
                            c,
                            selected.column(c).to_pylist(),
                            [threshold] if c == "score" and threshold is not None else [],
                        )
                        for c in ("clip_score", "ssim", "score")
                    ],
                    "selected (dashed: threshold)",
                ),
                "contact_sheet": contact_sheet(
                    [
                        (
                            root.read_bytes(f"{base}/{image_path(r['rank'], r['caption_id'])}"),
                            f"#{r['rank']} {r['score']:.3f} {r['caption']}",
                        )
                        for r in sheet_rows
                    ],
                    "top 8 and bottom 8 selected" + (" - tiny preset, meaningless" if out.tiny else ""),
                ),
                "llava_json": MetadataValue.path(root.uri(f"{base}/{DATASET}.json")),
                "dataset_card": MetadataValue.path(root.uri(f"{base}/README.md")),
                "lineage_parquet": MetadataValue.path(root.uri(f"{base}/lineage.parquet")),
                "version": out.manifest["version"],
            }
        ),
        check_results=[
            AssetCheckResult(check_name=name, passed=passed, metadata=seen)
            for name, (passed, seen) in out.checks.items()
        ],
    )

"""SPEC §2 as an asset: sdxl_images, one partition per caption shard, on a GPU worker."""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from synthvlm_assets.captions.judge.stage import ASSET as JUDGED
from synthvlm_assets.defs.judge import judged_captions
from synthvlm_assets.defs.automation import partition_data_version
from synthvlm_assets.defs.metadata import contact_sheet, rounded, table
from synthvlm_assets.defs.partitions import GPU_TAGS, caption_shards
from synthvlm_assets.defs.resources import StorageResource, SynthesisResource
from synthvlm_assets.defs.retries import SHARD_RETRY_POLICY, retry_only_transient
from synthvlm_assets.progress import ProgressLog
from synthvlm_assets.shards import ShardRegistryError
from synthvlm_assets.synthesis.stage import ASSET, image_checks, image_sizes, synthesize_shard, wanted_images

FLAGGED_ROWS = 20  # flagged images listed in the metadata (all of them are in the manifest)


@asset(
    deps=[judged_captions],
    partitions_def=caption_shards,
    retry_policy=SHARD_RETRY_POLICY,
    kinds={"pytorch", "webdataset"},
    group_name="synthesis",
    pool="gpu",
    op_tags=GPU_TAGS,
    check_specs=[
        AssetCheckSpec(
            "every_caption_has_its_images",
            asset=ASSET,
            blocking=True,
            description="Each (caption, candidate) has a JPEG in the tar or a recorded flag.",
        ),
        AssetCheckSpec("image_size", asset=ASSET, blocking=True, description="Every JPEG has the configured size."),
        AssetCheckSpec(
            "no_unusable_images",
            asset=ASSET,
            description="No NaN, black or constant image (flagged ones are left out of the tar, listed here).",
        ),
    ],  # fmt: skip
)
@retry_only_transient
def sdxl_images(
    context: AssetExecutionContext, storage: StorageResource, synthesis: SynthesisResource
) -> MaterializeResult:
    """SDXL images of the shard's judged (kept) captions (`images_per_caption` candidates each, seeded by
    caption id and candidate), as a WebDataset tar of JPEGs plus a Parquet manifest."""
    root = storage.root()
    shard = context.partition_key
    settings = synthesis.settings()
    captions = root.read_partition(f"{JUDGED}/{shard}", "kept", columns=["caption_id", "caption"])
    generator = synthesis.generator_factory(storage.s3_endpoint_url)
    progress = ProgressLog(context.log.info, f"{ASSET} {shard}", "images")
    result = synthesize_shard(root, shard, captions, settings, generator, run_id=context.run.run_id, progress=progress)
    manifest = result.manifest

    rows = manifest.to_pylist()
    # A contact sheet (a matplotlib render, a ~100 KB event) only on the first shard of each file: where a
    # person looks at a shard's images; the dataset's contact sheet is on synthvlm_100k.
    sample_rows = [r for r in rows if not r["flag"]][:16] if _first_of_its_file(storage, shard) else []
    tar_key = root.manifest(result.prefix)["tar"]["key"]
    with root.fs.open(root.path(tar_key), "rb") as f:
        sizes, jpegs = image_sizes(f, keep={r["key"] for r in sample_rows})
    wanted = wanted_images(captions, settings)
    flags = [r for r in rows if r["flag"]]
    stats = _generation_stats(result.generator)
    metadata = {
        "model": settings.model if not settings.is_tiny else "tiny (random weights: the images are meaningless)",
        "refiner": settings.refiner_model or "none",
        "settings": MetadataValue.json(settings.image_settings()),
        "images": len(wanted),
        "generated": result.generated,
        "reused": result.reused,
        "already_done": result.skipped,
        "flagged": len(flags),
        **stats,
        "tar": MetadataValue.path(root.uri(tar_key)),
        "manifest": MetadataValue.path(root.uri(f"{result.prefix}/manifest.parquet")),
    }
    if flags:
        metadata["flagged_images"] = table(
            ["caption_id", "candidate", "flag"],
            [[r["caption_id"], r["candidate"], r["flag"]] for r in flags[:FLAGGED_ROWS]],
        )
    if sample_rows:
        metadata["contact_sheet"] = contact_sheet(
            [(jpegs[r["key"]], r["caption"]) for r in sample_rows if r["key"] in jpegs],
            f"{shard}" + (" - tiny preset, random weights" if settings.is_tiny else ""),
        )
    checks = image_checks(rows, sizes, wanted, settings)
    return MaterializeResult(
        data_version=partition_data_version(root, result.prefix),
        metadata=rounded(metadata),
        check_results=[
            AssetCheckResult(
                check_name=name,
                passed=passed,
                metadata=seen,
                # Flagged images are left out of the tar and listed: a warning, the shard goes on.
                severity=AssetCheckSeverity.WARN if name == "no_unusable_images" else AssetCheckSeverity.ERROR,
            )
            for name, (passed, seen) in checks.items()
        ],
    )


def _generation_stats(gen) -> dict:
    """images/s and seconds of this materialization's generation; GPU-seconds and peak GPU memory only on CUDA."""
    if gen is None or not gen.stats.images:
        return {"generation_seconds": 0.0}  # always there: AutomationDriver and the benchmarks sum it
    out = {
        "generation_seconds": gen.stats.seconds,
        "images_per_s": gen.stats.images / gen.stats.seconds,
        "redecoded_fp32": gen.stats.redecoded_fp32,
    }
    if gen.device == "cuda":
        import torch

        out["gpu_s"] = gen.stats.seconds
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _first_of_its_file(storage: StorageResource, shard: str) -> bool:
    try:
        return storage.registry().shard(shard).start == 0
    except ShardRegistryError:
        return False

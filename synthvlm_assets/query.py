"""DuckDB over the Parquet tables in place (local folder or S3 through fsspec).

synthvlm sql "SELECT reject_reason, count(*) FROM rejected_captions GROUP BY 1"
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from synthvlm_assets.captions.curation import CURATED_SCHEMA
from synthvlm_assets.captions.filters import FILTER_NAMES
from synthvlm_assets.captions.judge.stage import JUDGED_SCHEMA
from synthvlm_assets.captions.sources import MALFORMED_SCHEMA, RAW_SCHEMA
from synthvlm_assets.scoring.stage import SCORES_SCHEMA
from synthvlm_assets.storage import StorageRoot
from synthvlm_assets.synthesis.stage import MANIFEST_SCHEMA

# view name -> (glob under the storage root, schema when no partition exists yet)
VIEWS: dict[str, tuple[str, pa.Schema]] = {
    "raw_captions": ("raw_caption_pool/*/captions.parquet", RAW_SCHEMA),
    "malformed_captions": ("raw_caption_pool/*/malformed.parquet", MALFORMED_SCHEMA),
    "curated_captions": ("curated_captions/*/kept.parquet", CURATED_SCHEMA),
    "rejected_captions": ("curated_captions/*/rejected.parquet", CURATED_SCHEMA),
    "judged_captions": ("judged_captions/*/judged.parquet", JUDGED_SCHEMA),
    "sdxl_images": ("sdxl_images/*/manifest.parquet", MANIFEST_SCHEMA),
    "image_scores": ("image_scores/*/scores.parquet", SCORES_SCHEMA),
}


def connect(storage: StorageRoot, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per table; S3 goes through fsspec (no httpfs download)."""
    con = duckdb.connect(database)
    if not storage.is_local:
        con.register_filesystem(storage.fs)
    for view, (pattern, schema) in VIEWS.items():
        if storage.fs.glob(storage.path(pattern)):
            con.execute(
                f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet('{storage.uri(pattern)}', "
                "union_by_name=true)"
            )
        else:
            con.register(f"_{view}_empty", schema.empty_table())
            con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM _{view}_empty")
    dataset = storage.manifest("synthvlm_100k")
    if dataset is not None:  # the current version of SynthVLM-100K
        con.execute(
            "CREATE OR REPLACE VIEW synthvlm_100k AS SELECT * FROM "
            f"read_parquet('{storage.uri(dataset['prefix'] + '/selection.parquet')}')"
        )
    return con


def lineage(storage: StorageRoot, caption_id: str) -> dict:
    """One caption's whole chain: source file and row, raw and normalised text, filter values and
    verdict, the LLM judge's verdict, every candidate image (seed, model, settings, flag, scores), its rank in
    SynthVLM-100K, and the Dagster run ids that produced each step."""
    con = connect(storage)

    def rows(sql: str) -> list[dict]:
        rel = con.sql(sql, params={"id": caption_id})
        return [dict(zip(rel.columns, r)) for r in rel.fetchall()]

    raw = rows("SELECT * EXCLUDE (dedup_key) FROM raw_captions WHERE caption_id = $id")
    if not raw:
        raise KeyError(
            f"caption {caption_id!r} is in no materialized raw_caption_pool partition under {storage.uri()}"
        )
    shard = raw[0]["shard"]
    curated = rows(
        "SELECT *, reject_reason IS NULL AS kept FROM (SELECT * FROM curated_captions UNION ALL SELECT * FROM "
        "rejected_captions) WHERE caption_id = $id"
    )
    judged = rows(
        "SELECT verdict, p_yes, raw_token, judge_model, judge_revision, prompt_version, reject_reason FROM "
        "judged_captions WHERE caption_id = $id"
    )
    images = rows(
        "SELECT m.candidate, m.seed, m.key, m.flag, m.model, m.model_revision, m.settings, s.clip_score, s.ssim, "
        "s.score"
        " FROM sdxl_images m LEFT JOIN image_scores s USING (caption_id, candidate) WHERE m.caption_id = $id ORDER BY "
        "m.candidate"
    )
    selected = (
        rows("SELECT rank, candidate, score FROM synthvlm_100k WHERE caption_id = $id")
        if storage.manifest("synthvlm_100k")
        else []
    )
    runs = {
        asset: (storage.manifest(f"{asset}/{shard}") or {}).get("run_id")
        for asset in ("raw_caption_pool", "curated_captions", "judged_captions", "sdxl_images", "image_scores")
    }
    runs["synthvlm_100k"] = (storage.manifest("synthvlm_100k") or {}).get("run_id")
    return {
        "caption_id": caption_id,
        "source": {k: raw[0][k] for k in ("source_file", "source_row", "source_id", "source", "image_ref", "shard")},
        "caption": raw[0]["caption"],
        "caption_normalized": raw[0]["caption_normalized"],
        "curation": {k: v for k, v in curated[0].items() if k not in raw[0] or k == "caption"} if curated else None,
        "judge": judged[0] if judged else None,
        "images": images,
        "synthvlm_100k": selected[0] if selected else None,
        "run_ids": runs,
    }


STEPS = (
    "raw_caption_pool",
    "curated_captions",
    "pair_filtered_captions",
    "judged_captions",
    "sdxl_images",
    "image_scores",
)


def lineage_table(storage: StorageRoot, selection: pa.Table, selection_run_id: str = "") -> pa.Table:
    """Per-image provenance, one row per candidate image of every scored shard: source file and row,
    caption ids, raw and normalised caption, rule-filter values, judge verdict and p_yes with the prompt
    version, seed, generator model, revision and settings hash, clip_score, ssim, score, rank in the
    selection (null if not selected), and the Dagster run id of every step."""
    con = connect(storage)
    shards = [r[0] for r in con.sql("SELECT DISTINCT shard FROM image_scores").fetchall()]
    runs = pa.table(
        {
            "shard": pa.array(shards, pa.string()),
            **{
                f"run_{step}": pa.array(
                    [(storage.manifest(f"{step}/{s}") or {}).get("run_id") for s in shards], pa.string()
                )
                for step in STEPS
            },
        }
    )
    con.register("step_runs", runs)
    con.register("selection", selection.select(["caption_id", "candidate", "rank"]))
    filters = ", ".join(f"c.{name}" for name in FILTER_NAMES)
    return con.sql(
        f"""
        SELECT m.caption_id, m.candidate, r.source_file, r.source_row, r.source_id, r.shard,
               r.caption AS caption_raw, r.caption_normalized, {filters},
               j.verdict AS judge_verdict, j.p_yes AS judge_p_yes, j.prompt_version AS judge_prompt_version,
               j.judge_model, j.judge_revision,
               m.seed, m.key AS image_key, m.model AS generator_model, m.model_revision AS generator_revision,
               substr(sha256(m.settings), 1, 16) AS generator_settings_hash, m.flag AS image_flag,
               s.clip_score, s.ssim, s.score, s.lambda, sel.rank,
               {", ".join(f"sr.run_{step}" for step in STEPS)}, $selection_run AS run_synthvlm_100k
        FROM image_scores s
        JOIN sdxl_images m USING (caption_id, candidate)
        JOIN raw_captions r ON r.caption_id = m.caption_id
        LEFT JOIN curated_captions c ON c.caption_id = m.caption_id
        LEFT JOIN judged_captions j ON j.caption_id = m.caption_id
        LEFT JOIN selection sel ON sel.caption_id = m.caption_id AND sel.candidate = m.candidate
        LEFT JOIN step_runs sr ON sr.shard = r.shard
        ORDER BY sel.rank NULLS LAST, m.caption_id, m.candidate
        """,
        params={"selection_run": selection_run_id},
    ).to_arrow_table()

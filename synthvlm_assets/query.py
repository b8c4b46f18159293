"""DuckDB over the Parquet tables in place (local folder or S3 through fsspec).

    synthvlm sql "SELECT reject_reason, count(*) FROM rejected_captions GROUP BY 1"
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from synthvlm_assets.captions.curation import CURATED_SCHEMA
from synthvlm_assets.captions.sources import MALFORMED_SCHEMA, RAW_SCHEMA
from synthvlm_assets.storage import StorageRoot

# view name -> (glob under the storage root, schema when no partition exists yet)
VIEWS: dict[str, tuple[str, pa.Schema]] = {
    "raw_captions": ("raw_caption_pool/*/captions.parquet", RAW_SCHEMA),
    "malformed_captions": ("raw_caption_pool/*/malformed.parquet", MALFORMED_SCHEMA),
    "curated_captions": ("curated_captions/*/kept.parquet", CURATED_SCHEMA),
    "rejected_captions": ("curated_captions/*/rejected.parquet", CURATED_SCHEMA),
}


def connect(storage: StorageRoot, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per table; S3 goes through fsspec (no httpfs download)."""
    con = duckdb.connect(database)
    if not storage.is_local:
        con.register_filesystem(storage.fs)
    for view, (pattern, schema) in VIEWS.items():
        if storage.fs.glob(storage.path(pattern)):
            con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet('{storage.uri(pattern)}', union_by_name=true)")
        else:
            con.register(f"_{view}_empty", schema.empty_table())
            con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM _{view}_empty")
    return con

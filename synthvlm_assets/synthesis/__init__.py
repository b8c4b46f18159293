"""SPEC §2: SDXL image synthesis from curated captions (no Dagster here)."""

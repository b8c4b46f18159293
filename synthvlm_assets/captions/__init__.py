"""SPEC §1: caption sources, normalisation, rule filters and duplicate removal (no Dagster here)."""

"""SPEC §5: the dataset formats SynthVLM-100K is written in (no Dagster here)."""

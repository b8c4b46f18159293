"""SPEC §6: LLaVA-1.5 training on SynthVLM-100K with transformers' native LLaVA classes (no Dagster imports)."""

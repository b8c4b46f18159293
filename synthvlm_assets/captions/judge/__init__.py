"""SPEC §1's LLM judge: prompt assembly as token ids, verdicts, backends (vLLM, HTTP, transformers)
and the per-shard stage with its verdict cache. No Dagster imports."""

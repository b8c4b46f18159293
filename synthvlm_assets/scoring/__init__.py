"""SPEC §3: CLIPScore and SSIM of generated images (no Dagster here)."""

"""Resolve a model setting to something `from_pretrained` can load, with one clear error when the
weights are not there."""

from __future__ import annotations

import hashlib
import os
import posixpath

from synthvlm_assets.storage import filesystem_for, split_protocol

TINY = "tiny"


class ModelWeightsError(RuntimeError):
    """Weights are missing or unreadable; the message names the setting to change."""


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "synthvlm", "models")


def resolve_model(setting: str, value: str, cache_dir: str | None = None, s3_endpoint_url: str | None = None) -> str:
    """A Hugging Face id (returned as is: the HF cache applies), a local folder, or an s3:// prefix
    (copied once into `cache_dir`, completion-marked, and returned as a local folder)."""
    protocol, path = split_protocol(value)
    if protocol in ("s3", "s3a"):
        target = os.path.join(cache_dir or default_cache_dir(), hashlib.sha1(value.encode()).hexdigest()[:16])
        marker = os.path.join(target, ".complete")
        if not os.path.exists(marker):
            fs = filesystem_for(value, s3_endpoint_url)
            try:
                files = [p for p in fs.find(path) if not p.endswith("/")]
            except Exception as exc:  # noqa: BLE001
                raise ModelWeightsError(f"{setting}={value!r}: cannot list the prefix: {exc}") from exc
            if not files:
                raise ModelWeightsError(f"{setting}={value!r}: no files under this prefix")
            for remote in files:
                local = os.path.join(target, posixpath.relpath(remote, path))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get_file(remote, local + ".part")
                os.replace(local + ".part", local)
            open(marker, "w").close()
        return target
    if protocol == "file" and (value.startswith((".", "/", "~")) or os.path.isdir(path)):
        folder = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(folder):
            raise ModelWeightsError(f"{setting}={value!r}: no such folder")
        return folder
    return value  # a Hugging Face id


def load_error(setting: str, value: str, exc: BaseException) -> ModelWeightsError:
    return ModelWeightsError(
        f"could not load {setting}={value!r}: {type(exc).__name__}: {exc}. Set {setting} to a Hugging Face id "
        "(with network access or a filled HF cache), a local folder or an s3:// prefix holding the weights, "
        f"or to {TINY!r} for the small random test preset."
    )

"""The sensor that turns each new caption file under the input location into shard partitions."""

import json

from dagster import (
    DefaultSensorStatus,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from synthvlm_assets.captions.sources import SourceFormatError, list_caption_files
from synthvlm_assets.defs.partitions import caption_shards
from synthvlm_assets.defs.resources import CaptionSourceResource, StorageResource
from synthvlm_assets.shards import ShardRegistry, ShardRegistryError, fingerprint
from synthvlm_assets.storage import local_or_absolute, split_protocol


def register_new_files(
    registry: ShardRegistry, input_uri: str, shard_rows: int, skip: dict[str, dict]
) -> tuple[list[str], dict[str, dict]]:
    """Register every caption file under `input_uri` not registered yet.

    Returns the new shard keys and, per file that could not be registered, why (files in `skip` with
    an unchanged fingerprint are not scanned again).
    """
    input_uri = local_or_absolute(input_uri)  # the variable's value may be relative to the working directory
    fs = registry.source_fs(input_uri)
    protocol, path = split_protocol(input_uri)
    if not fs.exists(path):
        return [], {}
    known = {e["uri"] for e in registry.entries()}
    new_keys: list[str] = []
    failures: dict[str, dict] = {}
    for file_path in list_caption_files(fs, path):
        uri = file_path if protocol == "file" else f"{protocol}://{file_path}"
        if uri in known:
            continue
        version = json.dumps(fingerprint(fs, file_path), sort_keys=True)
        if skip.get(uri, {}).get("version") == version:
            failures[uri] = skip[uri]
            continue
        try:
            _, shards = registry.register_file(uri, shard_rows)
        except (SourceFormatError, ShardRegistryError) as exc:
            failures[uri] = {"version": version, "error": str(exc)}
            continue
        new_keys += [s.key for s in shards]
    return new_keys, failures


@sensor(
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Registers each new caption file under the input location as shards (new partitions); "
    "the automation sensor then runs each new shard's chain.",
)
def caption_file_sensor(
    context: SensorEvaluationContext, storage: StorageResource, caption_source: CaptionSourceResource
) -> SensorResult | SkipReason:
    registry = storage.registry()
    skip = json.loads(context.cursor) if context.cursor else {}
    new_keys, failures = register_new_files(registry, caption_source.input_uri, caption_source.shard_rows, skip)
    for uri, why in failures.items():
        if uri not in skip:
            context.log.warning(f"not a usable caption file, skipped until it changes: {uri}: {why['error']}")
    # Reconcile: every registered shard is a partition (also after a registration by hand or a crash).
    existing = set(context.instance.get_dynamic_partitions(caption_shards.name))
    missing = [s.key for s in registry.shards() if s.key not in existing]
    if not missing and not new_keys:
        return SkipReason(f"no new caption files under {caption_source.input_uri}")
    # No run requests here: a new partition is `newly_missing` for every per-shard asset's automation
    # condition, so the automation sensor runs its whole chain (and nothing runs twice).
    return SensorResult(
        dynamic_partitions_requests=[caption_shards.build_add_request(missing)] if missing else [],
        cursor=json.dumps(failures, sort_keys=True),
    )

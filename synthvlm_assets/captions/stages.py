"""The two per-shard caption stages (raw_caption_pool, curated_captions) over a range of shards, as
plain functions over the storage root (the assets call these; so do the benchmarks and the tests).
Output locations: `<asset>/<shard key>/<table>.parquet`.

A run covers many shards: orchestration is paid once per run, not once per shard. The work of each
shard (read + normalise, then filter + publish) runs in a pool of worker processes; only the
duplicate check runs in order in the calling process, against the keys of every shard registered
before (stored) and of the range's earlier shards (in memory), so the result does not depend on how
shards are grouped into runs. Each shard succeeds or fails on its own.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from synthvlm_assets.captions.curation import CurationResult, curate_captions
from synthvlm_assets.captions.dedup import DedupStore, RangeIndex, keys_of_raw
from synthvlm_assets.captions.filters import FILTER_NAMES, PerplexityModel, RuleFilterSettings
from synthvlm_assets.captions.sources import CaptionFields, SourceFormatError
from synthvlm_assets.shards import Shard, ShardRegistry, ShardRegistryError, read_shard
from synthvlm_assets.storage import StorageError, StorageRoot, is_transient

RAW = "raw_caption_pool"
CURATED = "curated_captions"
SAMPLE_ROWS = 2  # rows of each sample a shard records for the UI (its Parquet tables hold them all)


@dataclass
class RawShard:
    captions: pa.Table
    malformed: pa.Table
    prefix: str
    manifest: dict[str, Any]


def load_raw_shard(registry: ShardRegistry, shard: Shard, fields: CaptionFields, run_id: str = "") -> RawShard:
    """raw_caption_pool: read the shard's rows from its source file and publish them."""
    registry.check_unchanged(shard)
    captions, malformed = read_shard(shard, fields, registry.source_fs(shard.uri))
    prefix = f"{RAW}/{shard.key}"
    manifest = registry.storage.publish_partition(
        prefix, {"captions": captions, "malformed": malformed}, {"shard": shard.key, "run_id": run_id}
    )
    return RawShard(captions, malformed, prefix, manifest)


@dataclass
class CuratedShard:
    result: CurationResult
    raw_rows: int
    prefix: str
    manifest: dict[str, Any]


def curate_raw_shard(
    storage: StorageRoot,
    shard: Shard,
    fields: CaptionFields,
    settings: RuleFilterSettings,
    earlier_ids: Sequence[str | None],
    perplexity: PerplexityModel | None = None,
    run_id: str = "",
) -> CuratedShard:
    """curated_captions: normalise, filter and deduplicate the shard's published raw rows (given who had
    each row's text first in an earlier shard), store its dedup keys for later shards, and publish."""
    raw = storage.read_partition(f"{RAW}/{shard.key}", "captions")
    result = curate_captions(raw, settings, shard.file_seq, earlier_ids, perplexity)
    DedupStore(storage, fields).store(shard, result.dedup_keys)
    prefix = f"{CURATED}/{shard.key}"
    info = {"shard": shard.key, "run_id": run_id, "settings": settings.as_dict()}
    manifest = storage.publish_partition(prefix, {"kept": result.kept, "rejected": result.rejected}, info)
    return CuratedShard(result, raw.num_rows, prefix, manifest)


# -- what a shard reports (small, picklable: it crosses from the worker processes) ----------------
@dataclass
class RawSummary:
    prefix: str
    manifest: dict[str, Any]
    rows: int  # rows of the shard in its source file
    captions: int
    malformed: int
    malformed_by_reason: dict[str, int]
    malformed_sample: list[list[Any]]  # source_row, reason, detail
    caption_length: dict[str, float]  # quantiles of the caption length in code points
    unique_ids: bool


@dataclass
class CuratedSummary:
    prefix: str
    manifest: dict[str, Any]
    captions_in: int
    kept: int
    rejected: int
    rejected_by: dict[str, int]  # first failing filter (Table-1 order) or "duplicate"
    fails_alone: dict[str, int]  # per filter, rows failing it (a row may fail several)
    quantiles: dict[str, dict[str, float]]  # per filter statistic, over every row of the shard
    kept_sample: list[list[Any]]
    rejected_sample: list[list[Any]]
    unique_ids: bool
    earlier_shards: int
    earlier_distinct: int


@dataclass
class ShardOutcome:
    """One shard of a range: what each selected stage published, or why it did not."""

    shard: Shard
    raw: RawSummary | None = None
    curated: CuratedSummary | None = None
    error: str | None = None  # one line naming the shard, its file and the stage
    retryable: bool = False  # a transient cause (storage); bad input is never worth a retry
    stage: str | None = None  # the stage that failed


QUANTILES = (0.05, 0.5, 0.95)


def sample_rows(table: pa.Table, columns: Sequence[str], n: int = SAMPLE_ROWS) -> list[list[Any]]:
    """An evenly spaced, deterministic sample of a table's rows."""
    if table.num_rows == 0:
        return []
    step = max(1, table.num_rows // n)
    picked = table.take(list(range(0, table.num_rows, step))[:n]).select(list(columns))
    return [list(r.values()) for r in picked.to_pylist()]


def _quantiles(values: pa.Array | pa.ChunkedArray) -> dict[str, float]:
    values = pc.drop_null(values)
    if len(values) == 0:
        return {}
    qs = pc.quantile(values, q=list(QUANTILES), interpolation="nearest").to_pylist()
    return {f"p{round(q * 100)}": v for q, v in zip(QUANTILES, qs)}


def _unique(column: pa.ChunkedArray) -> bool:
    return pc.count_distinct(column).as_py() == len(column)


def summarize_raw(shard: Shard, out: RawShard) -> RawSummary:
    reasons: dict[str, int] = {}
    for reason in out.malformed.column("reason").to_pylist():
        reasons[reason] = reasons.get(reason, 0) + 1
    return RawSummary(
        prefix=out.prefix,
        manifest=out.manifest,
        rows=shard.rows,
        captions=out.captions.num_rows,
        malformed=out.malformed.num_rows,
        malformed_by_reason=dict(sorted(reasons.items())),
        malformed_sample=sample_rows(out.malformed, ["source_row", "reason", "detail"]),
        caption_length=_quantiles(pc.utf8_length(out.captions.column("caption"))),
        unique_ids=_unique(out.captions.column("caption_id")),
    )


def summarize_curated(out: CuratedShard, earlier_shards: int, earlier_distinct: int) -> CuratedSummary:
    result = out.result
    both = pa.concat_tables([result.kept, result.rejected])
    return CuratedSummary(
        prefix=out.prefix,
        manifest=out.manifest,
        captions_in=out.raw_rows,
        kept=result.kept.num_rows,
        rejected=result.rejected.num_rows,
        rejected_by=result.reason_counts(),
        fails_alone=result.failure_counts(),
        quantiles={name: _quantiles(both.column(name)) for name in FILTER_NAMES},
        kept_sample=sample_rows(result.kept, ["caption_id", "caption"]),
        rejected_sample=sample_rows(result.rejected, ["caption_id", "reject_reason", "caption"]),
        unique_ids=_unique(result.kept.column("caption_id")),
        earlier_shards=earlier_shards,
        earlier_distinct=earlier_distinct,
    )


# -- a range of shards ------------------------------------------------------------------------------
@dataclass
class CurationJob:
    """What every worker process of a run needs (sent once per process)."""

    storage: StorageRoot
    fields: CaptionFields
    settings: RuleFilterSettings
    run_id: str = ""
    _registry: ShardRegistry | None = field(default=None, repr=False)
    _perplexity: list = field(default_factory=list, repr=False)  # loaded once per process, on first use

    def registry(self) -> ShardRegistry:
        if self._registry is None:
            self._registry = ShardRegistry(self.storage)
        return self._registry

    def perplexity(self) -> PerplexityModel | None:
        if not self._perplexity:
            self._perplexity.append(self.settings.perplexity_model())
        return self._perplexity[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_registry": None, "_perplexity": []}


_JOB: CurationJob | None = None


def _init_worker(job: CurationJob) -> None:
    global _JOB
    _JOB = job


def _load(shard: Shard, load_raw: bool) -> tuple[RawSummary | None, list[bytes], pa.Table]:
    """Phase 1 of a shard: its raw partition (loaded and published, or read back), each row's dedup key
    and the shard's keys table (each distinct key at its first row)."""
    assert _JOB is not None
    if load_raw:
        out = load_raw_shard(_JOB.registry(), shard, _JOB.fields, _JOB.run_id)
        summary, raw = summarize_raw(shard, out), out.captions
    else:
        if _JOB.storage.manifest(f"{RAW}/{shard.key}") is None:
            raise ShardRegistryError(f"shard {shard.key}: raw_caption_pool is not materialized; materialize it first")
        summary = None
        raw = _JOB.storage.read_partition(f"{RAW}/{shard.key}", "captions", columns=["dedup_key", "source_row"])
    return summary, raw.column("dedup_key").to_pylist(), keys_of_raw(raw, shard.file_seq)


def _curate(shard: Shard, earlier_ids: list[str | None], earlier_shards: int, earlier_distinct: int) -> CuratedSummary:
    """Phase 2 of a shard: filters, duplicates (decided by the caller), publish."""
    assert _JOB is not None
    out = curate_raw_shard(
        _JOB.storage, shard, _JOB.fields, _JOB.settings, earlier_ids, _JOB.perplexity(), _JOB.run_id
    )
    return summarize_curated(out, earlier_shards, earlier_distinct)


class _Inline:
    """The pool's interface, run in this process (one shard, or one core)."""

    def submit(self, fn: Callable, *args: Any) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the caller like a worker's exception
            f.set_exception(exc)
        return f

    def shutdown(self, cancel_futures: bool = False) -> None:
        pass


def retryable(exc: BaseException) -> bool:
    """Bad input (a changed, missing or unreadable file, a missing upstream partition) is not worth a
    retry; a storage operation that failed for a transient reason is."""
    if isinstance(exc, (ShardRegistryError, SourceFormatError, ValueError, UnicodeError)):
        return False
    if isinstance(exc, StorageError):
        return exc.__cause__ is not None and is_transient(exc.__cause__)
    return is_transient(exc)


def _describe(shard: Shard, stage: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"shard {shard.key} ({shard.uri}, rows {shard.start}-{shard.end}): {stage}: {type(exc).__name__}: {text}"


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def curate_range(
    registry: ShardRegistry,
    keys: Sequence[str],
    fields: CaptionFields,
    settings: RuleFilterSettings,
    *,
    load_raw: bool = True,
    curate: bool = True,
    run_id: str = "",
    workers: int = 0,
) -> Iterator[ShardOutcome]:
    """Run raw_caption_pool and/or curated_captions for shards `keys`, yielding each shard's outcome
    in registration order as it completes. `workers`: processes (0: one per core; 1: this process)."""
    registered = registry.shards()
    by_key = {s.key: (i, s) for i, s in enumerate(registered)}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ShardRegistryError(f"shards not registered: {', '.join(missing[:5])}")
    ordered = sorted((by_key[k] for k in keys), key=lambda p: p[0])
    if not ordered:
        return
    dedup = DedupStore(registry.storage, fields)
    index: RangeIndex | None = None
    blocked: str | None = None  # why later shards of the range cannot be deduplicated now (a retry will)
    if curate:
        try:
            index = RangeIndex(dedup.earlier_index(registered[: ordered[0][0]], registry))
        except Exception as exc:  # noqa: BLE001 - the raw stage of the range still runs
            if not retryable(exc):
                raise
            blocked = f"the keys of earlier shards cannot be read now: {type(exc).__name__}: {exc}"
    previous = ordered[0][0]  # the registration position of the last shard whose keys the index has
    job = CurationJob(registry.storage, fields, settings, run_id)
    workers = min(workers or default_workers(), len(ordered))
    if workers > 1:
        # forkserver: the caller may be a multi-threaded process (Dagster's), where fork is unsafe; the
        # server imports only this module (not the caller's __main__), and each worker forks from it.
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        pool: ProcessPoolExecutor | _Inline = ProcessPoolExecutor(workers, ctx, _init_worker, (job,))
    else:
        _init_worker(job)
        pool = _Inline()
    window = 2 * workers  # shards in flight per phase: memory stays flat in the pool's size
    todo = deque(s for _, s in ordered)
    loading: deque[tuple[Shard, Future]] = deque()
    curating: deque[tuple[ShardOutcome, Future | None]] = deque()
    try:
        while todo or loading or curating:
            while todo and len(loading) < window:
                shard = todo.popleft()
                loading.append((shard, pool.submit(_load, shard, load_raw)))
            if loading and len(curating) < window:
                shard, future = loading.popleft()
                outcome = ShardOutcome(shard)
                try:
                    outcome.raw, row_keys, shard_keys = future.result()
                except Exception as exc:  # noqa: BLE001 - this shard fails alone
                    outcome.error, outcome.retryable, outcome.stage = _describe(shard, RAW, exc), retryable(exc), RAW
                    # A file that cannot be read never published a row for a later row to duplicate; one
                    # that failed for a transient reason may have, so later shards wait for a rerun.
                    if outcome.retryable and curate and blocked is None:
                        blocked = f"earlier shard {shard.key} failed to load"
                    curating.append((outcome, None))
                    continue
                position = by_key[shard.key][0]
                if index is not None and blocked is None:
                    try:  # shards between this one and the last of the range (a retry of part of a range)
                        for gap in registered[previous + 1 : position]:
                            if (gap_keys := dedup.shard_keys(gap, registry)) is not None:
                                index.add(gap_keys)
                    except Exception as exc:  # noqa: BLE001 - as above
                        if not retryable(exc):
                            raise
                        blocked = f"the keys of earlier shard {gap.key} cannot be read now: {exc}"
                previous = position
                if not curate:
                    curating.append((outcome, None))
                    continue
                if blocked is not None or index is None:
                    outcome.error = f"shard {shard.key}: {CURATED}: not curated: {blocked}"
                    outcome.retryable, outcome.stage = True, CURATED
                    curating.append((outcome, None))
                    continue
                earlier_ids = index.earlier_ids(row_keys)
                n_before, distinct = position, len(index.before) + len(index.added)
                index.add(shard_keys)
                curating.append((outcome, pool.submit(_curate, shard, earlier_ids, n_before, distinct)))
                continue
            outcome, future = curating.popleft()
            if future is not None:
                try:
                    outcome.curated = future.result()
                except Exception as exc:  # noqa: BLE001 - this shard fails alone
                    outcome.error = _describe(outcome.shard, CURATED, exc)
                    outcome.retryable, outcome.stage = retryable(exc), CURATED
            yield outcome
    finally:
        pool.shutdown(cancel_futures=True)

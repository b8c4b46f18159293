"""Step retries of the per-shard assets (the storage layer retries single operations first)."""

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import TypeVar

from dagster import Backoff, DagsterExecutionInterruptedError, Failure, Jitter, RetryPolicy

from synthvlm_assets.captions.stages import retryable

F = TypeVar("F", bound=Callable)

# A step whose storage operations kept failing past the storage layer's own retries (a store down for
# longer than ~25 s, a worker that lost its node) is run again whole: every per-shard asset rewrites
# its partition idempotently (same bytes; the manifest goes last), and synthesis resumes from staged
# batches, so a retry never duplicates rows. 30 s, then 60 s (+-50%).
SHARD_RETRY_POLICY = RetryPolicy(max_retries=2, delay=30, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)

INTERRUPTED = (
    "interrupted: the run is being terminated (not retried; what was staged or cached is reused by the next run)"
)


def retry_only_transient(fn: F) -> F:
    """Under @asset: an error that a retry cannot heal (bad input, a changed file, missing weights, a bug)
    fails the step at once with its one-line cause; transient ones (storage, network) take the retry policy.

    An interrupt (a terminated run: Dagster raises DagsterExecutionInterruptedError or KeyboardInterrupt in the
    step) fails the step without a retry. Dagster itself turns an interrupt into RetryRequested when the step
    has a retry policy, which left a cancelled run's step "up for retry" and then stuck in Preparing."""

    @contextlib.contextmanager
    def failures() -> Iterator[None]:
        try:
            yield
        except Failure:
            raise
        except (KeyboardInterrupt, DagsterExecutionInterruptedError) as exc:
            raise Failure(description=INTERRUPTED, allow_retries=False) from exc
        except Exception as exc:
            if retryable(exc):
                raise
            raise Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc

    if inspect.isgeneratorfunction(fn):  # an asset that yields: its errors come while it is iterated

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            with failures():
                yield from fn(*args, **kwargs)

        return generator  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with failures():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]

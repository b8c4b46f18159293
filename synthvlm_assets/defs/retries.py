"""Step retries of the per-shard assets (the storage layer retries single operations first)."""

from dagster import Backoff, Jitter, RetryPolicy

# A step whose storage operations kept failing past the storage layer's own retries (a store down for
# longer than ~25 s, a worker that lost its node) is run again whole: every per-shard asset rewrites
# its partition idempotently (same bytes; the manifest goes last), and synthesis resumes from staged
# batches, so a retry never duplicates rows. 30 s, then 60 s (+-50%).
SHARD_RETRY_POLICY = RetryPolicy(max_retries=2, delay=30, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)

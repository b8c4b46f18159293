"""Caption-curation benchmark: captions/s and peak RSS of raw_caption_pool + curated_captions
(read, normalise, six rule filters, cross-shard dedup, Parquet publish) over a pool of >= 1M captions.

    .venv/bin/python benchmarks/curation_benchmark.py --captions 1000000 --workers 2

The pool is synthesised from the COCO val2017 captions by repeating and perturbing them (word
swaps, casing, Unicode punctuation, mojibake, exact copies), written as JSONL, registered as shards
and curated by `curate_range` (what the caption assets run) with a pool of worker processes. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from synthvlm_assets.captions.filters import RuleFilterSettings
from synthvlm_assets.captions.sources import CaptionFields
from synthvlm_assets.captions.stages import curate_range
from synthvlm_assets.shards import ShardRegistry
from synthvlm_assets.storage import StorageRoot

DEFAULT_COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_captions_val2017.json"


def perturb(caption: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.25:
        return caption  # exact duplicate
    words = caption.split()
    if r < 0.5 and len(words) > 3:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    elif r < 0.65:
        words = [w.upper() if rng.random() < 0.2 else w for w in words]
    elif r < 0.75:
        words.append(rng.choice(["…", "—", "！", "“ok”", "ＡＢＣ", "cafÃ©"]))
    elif r < 0.9:
        words.insert(rng.randrange(len(words) + 1), rng.choice(["very", "small", "two", "old", "bright", "#tag"]))
    else:
        words = words + words  # repetitive: the repetition filters fire
    return " ".join(words)


def write_pool(coco: Path, n: int, path: Path, seed: int = 0) -> None:
    captions = [a["caption"] for a in json.loads(coco.read_text())["annotations"]]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "caption": perturb(captions[i % len(captions)], rng)}) + "\n")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(pool_path: Path, root: str, shard_rows: int, workers: int) -> dict:
    """Register the pool and curate every shard with the kernel the assets run (`curate_range`)."""
    registry = ShardRegistry(StorageRoot(root))
    t0 = time.perf_counter()
    _, shards = registry.register_file(str(pool_path), shard_rows)
    t_register = time.perf_counter() - t0
    keys = [s.key for s in shards]
    samples, n_in, n_kept = [], 0, 0
    marks = {max(1, len(keys) // 10), len(keys) // 4, len(keys) // 2, 3 * len(keys) // 4, len(keys)}
    t1 = time.perf_counter()
    outcomes = curate_range(registry, keys, CaptionFields(), RuleFilterSettings(), workers=workers)
    for i, outcome in enumerate(outcomes, 1):
        if outcome.error:
            raise RuntimeError(outcome.error)
        n_in, n_kept = n_in + outcome.curated.captions_in, n_kept + outcome.curated.kept
        if i in marks:
            samples.append((i / len(keys), rss_mb(), _children_peak_mb()))
    t_curate = time.perf_counter() - t1
    return {
        "shards": len(keys),
        "captions": n_in,
        "kept": n_kept,
        "register_s": t_register,
        "curate_s": t_curate,
        "rss": samples,
    }


def _children_peak_mb() -> float:
    """Peak RSS of the worker processes that have ended so far, or of this process when it curates alone."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return children or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=1_000_000)
    p.add_argument("--shard-rows", type=int, default=1000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--coco", type=Path, default=DEFAULT_COCO)
    p.add_argument("--workdir", type=Path, default=None, help="where the pool and outputs go (default: a temp dir)")
    args = p.parse_args()
    if not args.coco.exists():
        sys.exit(f"COCO captions not found at {args.coco} (--coco PATH)")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        pool = Path(tmp) / "pool.jsonl"
        t = time.perf_counter()
        write_pool(args.coco, args.captions, pool)
        print(
            f"synthesised {args.captions:,} captions ({pool.stat().st_size / 1e6:.0f} MB JSONL) in "
            f"{time.perf_counter() - t:.1f}s"
        )
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}"
        )
        rows = []
        for workers in sorted({1, args.workers}):
            r = run(pool, str(Path(tmp) / f"root-{workers}"), args.shard_rows, workers)
            rate = r["captions"] / r["curate_s"]
            rows.append((workers, r, rate))
            print(
                f"\nworkers={workers}: {r['shards']} shards, register {r['register_s']:.1f}s, curate "
                f"{r['curate_s']:.1f}s, kept {r['kept']:,}/{r['captions']:,}"
            )
            print("  progress  parent RSS (MB)  worker peak RSS (MB)")
            for frac, rss, peak in r["rss"]:
                print(f"  {frac:7.0%}  {rss:15.0f}  {peak:20.0f}")
        print(
            "\n| workers | shards | captions | curate s | captions/s | captions/min | worker peak RSS MB (10% -> "
            "100%) |"
        )
        print("|---|---|---|---|---|---|---|")
        for workers, r, rate in rows:
            peaks = f"{r['rss'][0][2]:.0f} -> {r['rss'][-1][2]:.0f}"
            print(
                f"| {workers} | {r['shards']} | {r['captions']:,} | {r['curate_s']:.1f} | {rate:,.0f} | "
                f"{rate * 60:,.0f} | {peaks} |"
            )
        if len(rows) == 2:
            print(f"\nspeed-up {rows[1][0]} workers vs 1: {rows[1][2] / rows[0][2]:.2f}x")
        print(f"parent peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()

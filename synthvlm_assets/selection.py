"""SPEC §4: score = clip_score + lambda * ssim; the best candidate per caption, then the global top K
(or a fraction) over all shards, ties broken by caption id, so the result is deterministic."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa


@dataclass(frozen=True)
class SelectionSettings:
    lam: float = 0.5
    k: int | None = 100_000
    fraction: float | None = None  # used instead of k when set: floor(fraction * captions scored)

    def __post_init__(self) -> None:
        if (self.k is None) == (self.fraction is None):
            raise ValueError("set exactly one of selection k and fraction")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"selection fraction must be in (0, 1], got {self.fraction}")


def select(scores: pa.Table, settings: SelectionSettings) -> tuple[pa.Table, int]:
    """The selected rows (best first, with their rank) and the number of captions that competed."""
    con = duckdb.connect()
    con.register("scores", scores)
    best = """
        SELECT * EXCLUDE (rn) FROM (
            SELECT * EXCLUDE (score), clip_score + $lam * ssim AS score,
                   row_number() OVER (PARTITION BY caption_id ORDER BY clip_score + $lam * ssim DESC, candidate) AS rn
            FROM scores)
        WHERE rn = 1"""
    n = con.sql(f"SELECT count(*) FROM ({best})", params={"lam": settings.lam}).fetchall()[0][0]
    k = settings.k if settings.k is not None else int(settings.fraction * n)
    table = con.sql(
        f"SELECT *, row_number() OVER (ORDER BY score DESC, caption_id) AS rank FROM ({best}) ORDER BY rank LIMIT $k",
        params={"lam": settings.lam, "k": k},
    ).to_arrow_table()
    return table, n

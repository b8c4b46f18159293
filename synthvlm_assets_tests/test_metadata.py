"""UI metadata helpers: rounded numbers, tables the UI shows inline."""

from __future__ import annotations

import math

from dagster import TableMetadataValue

from synthvlm_assets.defs.metadata import num, rounded, stats_table, table


def test_numbers_are_rounded_to_four_significant_digits():
    assert num(0.5319148936170213) == 0.5319 and num(1.23456789) == 1.235 and num(12345.6) == 12346.0
    assert num(0.000123456) == 0.0001235 and num(-2.0 / 3) == -0.6667 and math.isnan(num(float("nan")))
    md = rounded({"kept_fraction": 0.5319148936170213, "kept": 25, "model": "tiny", "ok": True})
    assert md == {"kept_fraction": 0.5319, "kept": 25, "model": "tiny", "ok": True}


def test_tables_round_and_type_their_columns():
    value = table(["set", "score"], [["a", 0.123456], ["b", None]])
    assert isinstance(value, TableMetadataValue)  # shown inline, not behind "[Show Markdown]"
    assert [r.data for r in value.records] == [{"set": "a", "score": 0.1235}, {"set": "b", "score": None}]
    assert [c.type for c in value.schema.columns] == ["string", "float"]
    stats = {r.data["value"]: r.data for r in stats_table({"x": [0.0, 1.0, None, 0.5], "empty": []}).records}
    assert stats["x"]["n"] == 3 and stats["x"]["p50"] == 0.5 and stats["x"]["max"] == 1.0
    assert stats["empty"]["n"] == 0 and stats["empty"]["p50"] is None

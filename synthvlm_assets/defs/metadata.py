"""What a person reads in the Dagster UI: numbers (rounded), tables, and plots where a person looks.

Per shard: numeric and table metadata, which the UI shows inline (and plots numbers across
materializations by itself). Rendered plots (markdown with an embedded PNG, since Dagster has no image
metadata type) only at dataset level or on a sample of shards: they cost a matplotlib render and a
multi-KB event each."""

from __future__ import annotations

import base64
import io
import textwrap
from collections.abc import Sequence
from typing import Any

from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

from synthvlm_assets.captions.stages import sample_rows  # noqa: F401 - the assets' samples, one definition


def num(v: float, digits: int = 4) -> float:
    """`digits` significant digits (0.5319148936170213 -> 0.5319), whole numbers kept whole (12345.6 -> 12346)."""
    if v != v or v in (float("inf"), float("-inf")):
        return v
    return float(round(v)) if abs(v) >= 10**digits else float(f"{v:.{digits}g}")


def rounded(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata with every plain float rounded by `num` (other values as they are)."""
    return {k: num(v) if isinstance(v, float) else v for k, v in metadata.items()}


def stats_table(columns: dict[str, Sequence[float | None]]) -> MetadataValue:
    """One row per named column of numbers: count, mean, min, p5, p50, p95, max (nulls left out)."""
    import numpy as np

    rows = []
    for name, values in columns.items():
        vals = np.asarray([v for v in values if v is not None], dtype=float)
        if vals.size:
            p5, p50, p95 = np.percentile(vals, [5, 50, 95])
            rows.append([name, int(vals.size), vals.mean(), vals.min(), p5, p50, p95, vals.max()])
        else:
            rows.append([name, 0])
    return table(["value", "n", "mean", "min", "p5", "p50", "p95", "max"], rows)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> MetadataValue:
    def cell(v: Any) -> str:
        text = f"{v:.6g}" if isinstance(v, float) else str(v)
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= 160 else text[:157] + "..."

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return MetadataValue.md("\n".join(lines))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> MetadataValue:
    """A small table the UI shows inline (no markdown to expand); long text cut, floats rounded."""

    def cell(v: Any) -> str | int | float | bool | None:
        if isinstance(v, float):
            return num(v)
        if v is None or isinstance(v, (int, bool)):
            return v
        text = str(v).replace("\n", " ")
        return text if len(text) <= 100 else text[:97] + "..."

    cells = [[cell(v) for v in row] + [None] * (len(headers) - len(row)) for row in rows]

    def kind(i: int) -> str:
        seen = {type(r[i]) for r in cells if i < len(r) and r[i] is not None}
        return "int" if seen == {int} else "float" if seen and seen <= {int, float} else "string"

    columns = [TableColumn(h, kind(i)) for i, h in enumerate(headers)]
    records = [TableRecord(dict(zip(headers, row))) for row in cells]
    return MetadataValue.table(records, schema=TableSchema(columns=columns))


def png_markdown(fig: Any) -> MetadataValue:
    """A matplotlib figure as an image the UI shows inline."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return MetadataValue.md(f"![plot](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})")


def histograms(panels: Sequence[tuple[str, Sequence[float], Sequence[float]]], title: str) -> MetadataValue:
    """One histogram per (name, values, threshold lines) panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, values, lines) in zip(axes.flat, panels):
        vals = [v for v in values if v is not None]
        ax.hist(vals, bins=40, color="#4C78A8")
        for x in lines:
            ax.axvline(x, color="#E45756", linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return png_markdown(fig)


def contact_sheet(images: Sequence[tuple[bytes, str]], title: str) -> MetadataValue:
    """A grid of encoded images with their captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    cols = 4
    rows = max(1, (len(images) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (data, caption) in zip(axes.flat, images):
        ax.imshow(Image.open(io.BytesIO(data)).convert("RGB"))
        ax.set_title(textwrap.fill(caption, 38)[:160], fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return png_markdown(fig)

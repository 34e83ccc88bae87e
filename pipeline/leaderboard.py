"""The leaderboard of a sweep as a table: aligned text columns (train-head's printout, the demo)
or Markdown (report.md). No torch: the command line imports it before any stage runs."""
from __future__ import annotations

# results.csv column -> its title; a table shows the columns it is given, in this order, less
# those empty in every row.
TITLES = {"rank": "#", "run_id": "run", "head": "head", "val_acc": "val acc",
          "val_balanced_acc": "bal acc", "val_top5": "top5", "val_loss": "val loss",
          "train_loss": "train loss", "test_acc": "test acc", "epochs_run": "epochs"}
LEFT = ("run_id", "head")   # text columns, left-aligned


def table(rows: list[dict], keys: tuple[str, ...], markdown: bool = False,
          limit: int | None = None, more: str = "results.csv", indent: str = "") -> list[str]:
    """The first `limit` (default all) `rows` as lines of a table of the columns `keys`:
    numbers to 4 decimals, run ids in backticks in Markdown, and a last line saying how many
    more rows are in `more` when some were left out."""
    columns = [k for k in TITLES if k in keys and any(r.get(k) is not None for r in rows)]
    shown = rows if limit is None else rows[:limit]
    body = [["" if r.get(k) is None else f"`{r[k]}`" if markdown and k == "run_id" else
             f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in columns]
            for r in shown]
    if markdown:
        lines = ["| " + " | ".join(TITLES[k] for k in columns) + " |",
                 "|" + "|".join("---" if k in LEFT else "---:" for k in columns) + "|",
                 *("| " + " | ".join(cells) + " |" for cells in body)]
    else:
        cells = [[TITLES[k] for k in columns], *body]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        lines = [indent + "  ".join(c.ljust(w) if k in LEFT else c.rjust(w)
                                    for k, c, w in zip(columns, row, widths)) for row in cells]
    if len(shown) < len(rows):
        lines.append(f"{indent}... {len(rows) - len(shown)} more in {more}")
    return lines


__all__ = ["TITLES", "table"]

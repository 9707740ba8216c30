"""Table 1 as text and as a figure: the cells ``mbvi table`` measured
(``mbvi.tracking.table``), rendered as markdown and as a matplotlib table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mbvi.tracking.table_cells import COLUMNS, POSTERIORS, TABLE_1, TITLES, Skip


@dataclass
class Measured:
    """One filled cell."""

    final_mean: float
    final_std: float
    seeds: int
    steps_per_s: float
    label: str  # the group it came from, e.g. "ModelBasedValue(H=2)"


def cell_lines(
    m: Measured | None, skip: Skip | None, failed: Sequence[str], note: str
) -> list[str]:
    """A cell's text, one item per line: return, steps/s, ms/step; or a mark."""
    if failed:
        return [f"FAILED{note}"]
    if skip is not None:
        return [f"—{note}"]
    if m is None:
        return ["not run"]
    return [f"{m.final_mean:.1f} ± {m.final_std:.1f} (n={m.seeds})",
            f"{m.steps_per_s:.1f} steps/s", f"{1e3 / m.steps_per_s:.1f} ms/step"]  # fmt: skip


def render(
    cells: dict, failed: dict, env_id: str, spec: dict | None = None
) -> tuple[list[str], list[list[list[str]]], list[str]]:
    """(column headers, body [row][column] -> lines, footnotes) of Table 1; ``spec``
    maps each cell to its overrides or ``Skip`` (default ``TABLE_1``)."""
    spec = TABLE_1 if spec is None else spec
    notes: list[str] = []
    marks: dict[str, str] = {}

    def note(text: str) -> str:
        if text not in marks:
            notes.append(text)
            marks[text] = f" [{len(notes)}]"
        return marks[text]

    horizons = sorted({m.label for (_, v, _), m in cells.items() if v == "model-based"})
    mb = f"model-based {', '.join(h.replace('ModelBasedValue', '') for h in horizons)}"
    head = ["posterior \\ value, prior",
            *(f"{mb if v == 'model-based' else v}, {p} prior" for v, p in COLUMNS)]  # fmt: skip
    body = []
    for posterior in POSTERIORS:
        line = [[TITLES[posterior]]]
        for value, prior in COLUMNS:
            cell = (posterior, value, prior)
            skip = spec[cell] if isinstance(spec[cell], Skip) else None
            names = failed.get(cell, [])
            mark = ""
            if names:
                mark = note(f"FAILED: {', '.join(names)}")
            elif skip is not None:
                mark = note(skip.reason)
            line.append(cell_lines(cells.get(cell), skip, names, mark))
        body.append(line)
    notes.append(f"{env_id}: final eval/return mean ± std over n seeds; env steps/s after "
                 "warm-up (acting + updates + evaluation); ms/step = 1000 / steps/s, the whole "
                 "env step (no finer planner timer is logged).")  # fmt: skip
    return head, body, notes


def markdown(head: list[str], body: list[list[list[str]]], notes: list[str]) -> str:
    rows = [head, ["---"] * len(head), *[[" · ".join(c) for c in row] for row in body]]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    marks = [f"[{i}] {n}" for i, n in enumerate(notes[:-1], 1)]
    return "\n".join([*lines, "", *marks, notes[-1]])


def plot_table(head, body, notes, title: str, path: Path) -> Path:
    """Table 1 as a matplotlib table, the notes beneath it."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 1.0 + 0.75 * (len(body) + 1) + 0.25 * len(notes)))
    foot = (0.3 + 0.25 * len(notes)) / fig.get_figheight()  # the notes' share of the height
    ax = fig.add_axes((0.01, foot, 0.98, 0.92 - foot))
    ax.axis("off")
    text = [["\n".join(c) for c in row] for row in body]
    table = ax.table(cellText=text, colLabels=["\n".join(textwrap.wrap(h, 28)) for h in head],
                     cellLoc="center", bbox=(0, 0, 1, 1))  # fmt: skip
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    footer = "\n".join(textwrap.fill(f"[{i}] {n}" if i < len(notes) else n, 230)
                       for i, n in enumerate(notes, 1))  # fmt: skip
    fig.text(0.01, 0.02, footer, fontsize=8, va="bottom")
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path

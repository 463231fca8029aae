"""
Results as people read them: markdown tables, JSON lines and the figures of val-loss curves.
One implementation for average.py, evaluate.py, the benchmarks and the experiments.

    print(markdown_table(rows, [("method", "method"), ("val loss", lambda r: f"{r['loss']:.4f}")]))
    append_jsonl("bench.jsonl", result)
    plot_curves(curves, "plot.png", title="...")
"""

import io
import json
from pathlib import Path

from checkpoint import atomic_write


def markdown_table(rows, columns):
    """A markdown table of `rows` (dicts). `columns` is [(header, key or function of a row)];
    None shows as an empty cell."""
    def cell(row, get):
        value = get(row) if callable(get) else row.get(get)
        return "" if value is None else str(value)
    lines = ["| " + " | ".join(header for header, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, get) for _, get in columns) + " |" for row in rows]
    return "\n".join(lines)


def append_jsonl(path, record):
    """Append `record` as one JSON line to `path` (a whole line per write, flushed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def plot_curves(curves, path, title, xlabel="step", ylabel="val loss"):
    """Val loss vs step, one line per curve: curves is {label: [(x, y), ...]}, the first one
    (the raw weights) drawn in black. Written as a PNG, atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, points) in enumerate(curves.items()):
        x, y = zip(*sorted(points))
        style = dict(color="black", linewidth=2.5) if i == 0 else {}
        ax.plot(x, y, marker=".", label=label, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    losses = [y for points in curves.values() for _, y in points]
    ax.set_ylim(min(losses) - 0.02, min(max(losses), sorted(losses)[len(losses) // 2] + 0.5))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return Path(path)

"""
Results as people read them: markdown tables, JSON lines, progress of long work, and the figures
of val-loss curves. One implementation for train.py, average.py, eval_ckpt.py, the benchmarks and
the experiments.

    print(markdown_table(rows, [("method", "method"), ("val loss", lambda r: f"{r['loss']:.4f}")]))
    append_jsonl("bench.jsonl", result)
    for item in progress(items, desc="snapshots"): ...
    plot_curves({"raw": [(step, loss), ...], "ema": [...]}, "plot.png", title="...")
"""

import io
import json
import math
import sys
import textwrap
import time
from pathlib import Path

from wagpt.atomic import atomic_write


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


def format_duration(seconds):
    """12345 -> '3:25:45' (h:mm:ss), for ETAs and elapsed times."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress of long work that shows in any log: a tqdm bar on a terminal; elsewhere (SLURM,
    nohup, a pipe) a line on stderr every `every` seconds and at the end,
    `snapshots: 12/41 (29%), 0:01:03 elapsed, eta 0:02:34`."""

    def __init__(self, total, desc, every=30.0, stream=None):
        self.total, self.desc, self.every = total, desc, every
        self.stream = stream or sys.stderr
        self.done, self.start = 0, time.perf_counter()
        self.last_line = self.start
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, file=self.stream)

    def update(self, n=1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last_line >= self.every or self.done == self.total:
            self.last_line = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now=None):
        elapsed = (now or time.perf_counter()) - self.start
        text = f"{self.desc}: {self.done}/{self.total}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {format_duration(elapsed)} elapsed"
        if self.total and 0 < self.done < self.total:
            text += f", eta {format_duration(elapsed / self.done * (self.total - self.done))}"
        return text

    def close(self):
        if self.bar is not None:
            self.bar.close()


def progress(items, desc, total=None, every=30.0):
    """Iterate over `items`, reporting progress as Progress does."""
    items = list(items) if total is None else items
    meter = Progress(len(items) if total is None else total, desc, every)
    try:
        for item in items:
            yield item
            meter.update()
    finally:
        meter.close()


MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")


def plot_curves(curves, path, title, xlabel="step", ylabel="val loss", reference=None,
                spread=None, gain_spread=None, panels=(), unit="nats/token", groups=None,
                xscale="linear"):
    """Val loss vs x, one line per curve ({label: [(x, y), ...]}), and below it the gain of each
    curve over its reference curve at the x they share. `reference` is a label (default: the
    first, the raw weights) or {label: its reference label} (curves compared with different
    baselines, e.g. the raw weights of two runs; a curve without an entry has no gain line).
    Over seeds: `spread` {label: [(x, s), ...]} shades y ± s around a curve (its std) and
    `gain_spread` the same around its gain (the std of the paired differences).
    `panels` [(ylabel, {label: [(x, y), ...]}, spread or None), ...] adds panels of other
    quantities of the same curves (same labels, colors and markers) between the two.
    `unit` is the loss's (nats/token; nats/char for a character-level model), shown on the
    loss and gain axes. `groups` {title: [labels]} draws small multiples instead of one panel:
    a column per group (three to a row) with its own axes, each curve in the same style
    wherever it appears. `xscale` is matplotlib's ("log" for learning rates).
    Every curve has its own marker and line style, so curves that coincide stay visible; the
    legend sits outside the axes and the figure grows to hold it; the y axis leaves out curves
    far above the others only with a note above the axes saying which (no silent clipping).
    Written as a PNG, atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(curves)
    if not isinstance(reference, dict):
        reference = dict.fromkeys(labels, labels[0] if reference is None else reference)
    references = list(dict.fromkeys(reference.values()))
    spread, gain_spread = spread or {}, gain_spread or {}
    grouped = groups is not None
    groups = groups if grouped else {None: labels}
    unknown = [label for members in groups.values() for label in members if label not in curves]
    if unknown:
        raise ValueError(f"groups name curves that are not plotted: {unknown}")
    styles = {label: _style(i, label, references) for i, label in enumerate(labels)}
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    others = [label for label in labels if label not in references]
    colors = {label: cycle[i % len(cycle)] for i, label in enumerate(others)}
    group_rows = -(-len(groups) // 3)             # at most three groups to a row,
    per_row = -(-len(groups) // group_rows)        # as evenly as that allows
    rows_per_group = 2 + len(panels)
    fig = plt.figure(figsize=(10 if not grouped else 5.2 * per_row,
                              (7.5 + 2 * len(panels)) * (1 if not grouped else 0.8) * group_rows))
    grid = fig.add_gridspec(rows_per_group * group_rows, per_row,
                            height_ratios=[3, *[2] * len(panels), 2] * group_rows)
    handles = {}
    for g, (group_title, members) in enumerate(groups.items()):
        row0, col = rows_per_group * (g // per_row), g % per_row
        top = fig.add_subplot(grid[row0, col])
        axes = [top] + [fig.add_subplot(grid[row0 + r, col], sharex=top)
                        for r in range(1, rows_per_group)]
        middle, bottom = axes[1:-1], axes[-1]
        gains = {}
        # in a group, a reference curve is drawn over the x of the curves compared with it
        compared = [x for label in members if label not in references for x, _ in curves[label]]
        x_min, x_max = ((min(compared), max(compared)) if grouped and compared
                        else (-math.inf, math.inf))
        shown = {label: sorted(p for p in curves[label] if x_min <= p[0] <= x_max)
                 for label in members}
        for label in members:
            style = {"color": colors.get(label), **styles[label]}
            x, y = zip(*shown[label])
            line, = top.plot(x, y, label=label, **style)
            colors[label] = line.get_color()
            handles.setdefault(label, line)
            rest = {k: v for k, v in style.items() if k != "color"}
            _band(top, shown[label], spread.get(label), colors[label])
            for ax, (_, values, bands) in zip(middle, panels):
                if values.get(label):
                    ax.plot(*zip(*sorted(values[label])), color=colors[label], **rest)
                    _band(ax, values[label], (bands or {}).get(label), colors[label])
            base = dict(curves[reference[label]]) if reference.get(label) in curves else {}
            if label != reference.get(label) and base:
                gains[label] = sorted((xi, base[xi] - yi) for xi, yi in zip(x, y) if xi in base)
            if gains.get(label):
                bottom.plot(*zip(*gains[label]), color=colors[label], **rest)
                _band(bottom, gains[label], gain_spread.get(label), colors[label])
        bottom.axhline(0.0, color="black", linewidth=1.5)
        if col == 0:
            top.set_ylabel(f"{ylabel} ({unit})" if unit else ylabel)
            over = references[0] if len(references) == 1 else "its reference"
            bottom.set_ylabel(f"gain over {over}" + (f" ({unit})" if unit else "") +
                              "\n(reference − curve, > 0 is better)")
            for ax, (panel_label, _, _) in zip(middle, panels):
                ax.set_ylabel(panel_label)
        bottom.set_xlabel(xlabel)
        top.set_xscale(xscale)
        xs = sorted({x for label in members for x, _ in shown[label]})
        if xscale == "log" and 0 < len(xs) <= 8:   # a sweep: label its own values, plainly
            top.set_xticks(xs, [f"{x:g}" for x in xs])
            top.minorticks_off()
        for ax in axes[:-1]:
            ax.tick_params(labelbottom=False)
        member_set = set(members)
        for ax, values in ((top, shown),
                           *((ax, {k: v for k, v in p[1].items() if k in member_set})
                             for ax, p in zip(middle, panels)),
                           (bottom, gains)):
            ax.grid(alpha=0.3)
            clipped = _limit_y(ax, values)
            note_lines = 0
            if clipped:   # said above the axes, never silent, never over the data
                lo, hi = ax.get_ylim()
                note = _clip_note(lo, hi, clipped, width=60 if grouped else 90)
                note_lines = note.count("\n") + 1
                ax.text(1.0, 1.01, note, transform=ax.transAxes, fontsize=7, va="bottom",
                        ha="right", color="dimgray", clip_on=False)
            if ax is top and group_title is not None:   # above the note, not under it
                top.set_title(group_title, fontsize=10, loc="left", pad=6 + 9 * note_lines)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if grouped:   # one legend for every panel, below them, as wide as the figure needs
        legend = fig.legend(list(handles.values()), list(handles), loc="upper center",
                            bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(handles)), fontsize=8,
                            frameon=False)
    else:         # beside the top axes; the figure grows instead of the axes shrinking
        legend = fig.axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                                    frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight",   # the legend included
                bbox_extra_artists=[*fig.get_default_bbox_extra_artists(), legend])
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return Path(path)


def _style(i, label, references):
    """Line style of curve i: the reference curves thick, black to gray with markers; every
    other curve its own marker and line style."""
    if label in references:
        k = references.index(label)
        return dict(color=("black", "dimgray", "gray")[k % 3], linewidth=2.5, marker="o",
                    markersize=4, zorder=5, linestyle=LINESTYLES[k % len(LINESTYLES)])
    return dict(marker=MARKERS[(i - 1) % len(MARKERS)], markersize=5,
                linestyle=LINESTYLES[(i - 1) // len(MARKERS) % len(LINESTYLES)],
                markerfacecolor="none", linewidth=1.3)


def _band(ax, points, spread, color):
    """Shade y ± s over the x where both the curve and its spread are known."""
    if not spread:
        return
    s = dict(spread)
    x = [xi for xi, _ in sorted(points) if xi in s]
    if len(x) < 2:
        return
    y = dict(points)
    ax.fill_between(x, [y[xi] - s[xi] for xi in x], [y[xi] + s[xi] for xi in x], color=color,
                    alpha=0.15, linewidth=0)


def _clip_note(lo, hi, clipped, width=70):
    """'y axis shows lo to hi; partly outside: a, b', wrapped to the axes' width (long legends
    would otherwise stretch the figure); beyond 4 curves, their count."""
    names = ", ".join(clipped) if len(clipped) <= 4 else f"{len(clipped)} curves"
    return "\n".join(textwrap.wrap(f"y axis shows {lo:.3g} to {hi:.3g}; partly outside: {names}",
                                    width))


def _limit_y(ax, curves):
    """Fit the y range to the bulk of the values: a curve reaching far beyond the others (a
    diverged setting) is left partly outside, and its label returned so the plot can say so."""
    values = sorted(y for points in curves.values() for _, y in points if math.isfinite(y))
    if not values:
        return []
    q1, q3 = values[len(values) // 4], values[(3 * len(values)) // 4]
    spread = 1.5 * max(q3 - q1, 1e-3)   # Tukey's fences: beyond 1.5 interquartile ranges
    low, high = max(values[0], q1 - spread), min(values[-1], q3 + spread)
    pad = 0.04 * max(high - low, 1e-3)
    ax.set_ylim(low - pad, high + pad)
    return [label for label, points in curves.items()
            if any(not low - pad <= y <= high + pad for _, y in points)]

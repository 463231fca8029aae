"""wagpt/report.py: tables, progress lines that reach non-interactive logs, and curve plots that
hide nothing."""

import io

import pytest

import sample
from wagpt import report
from wagpt.configurator import load_config
from wagpt.errors import ConfigError


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures plot_curves makes, in order (it closes them; they stay readable)."""
    import matplotlib.pyplot as plt
    made = []
    real = plt.figure
    monkeypatch.setattr(plt, "figure", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    return made


def test_markdown_table():
    rows = [{"a": 1, "b": None}, {"a": 2, "b": "x"}]
    assert report.markdown_table(rows, [("A", "a"), ("twice", lambda r: 2 * r["a"]),
                                        ("B", "b")]) == \
        "| A | twice | B |\n|---|---|---|\n| 1 | 2 |  |\n| 2 | 4 | x |"


def test_progress_writes_lines_where_there_is_no_terminal(monkeypatch):
    stream = io.StringIO()   # not a tty: SLURM, nohup, a pipe
    clock = iter([0.0, 5.0, 40.0, 41.0, 100.0])
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(clock))
    meter = report.Progress(4, "snapshots", every=30.0, stream=stream)
    for _ in range(4):
        meter.update()
    lines = stream.getvalue().splitlines()
    # one line once 30 s have passed, one at the end; none in between
    assert lines == ["snapshots: 2/4 (50%), 0:00:40 elapsed, eta 0:00:40",
                     "snapshots: 4/4 (100%), 0:01:40 elapsed"]


def test_plot_marks_every_curve_and_says_what_is_outside(tmp_path, monkeypatch):
    texts, positions = [], []
    import matplotlib.axes
    real_text = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, *a, **k: (
        texts.append(a[2]), positions.append(a[:3]), real_text(self, *a, **k))[-1])
    steps = range(0, 500, 50)
    curves = {"raw": [(s, 3 - s / 500) for s in steps],
              "swa": [(s, 3.01 - s / 500) for s in steps],
              "wa": [(s, 3.01 - s / 500) for s in steps],          # coincides with swa
              "ouema": [(s, 3 + s / 50) for s in steps]}            # diverges
    path = report.plot_curves(curves, tmp_path / "p.png", title="run on data")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("partly outside: ouema" in t for t in texts)   # never clipped silently
    assert all(y > 1 for _, y, t in positions if "partly outside" in t)   # above the axes,
                                                                          # not over the data
    before = len(texts)
    report.plot_curves({k: v for k, v in curves.items() if k != "ouema"}, tmp_path / "q.png",
                       title="t")
    assert not any("partly outside" in t for t in texts[before:])


def test_small_multiples_keep_each_curve_in_its_style(tmp_path, figures):
    steps = range(0, 400, 50)
    curves = {"raw": [(s, 3 - s / 500) for s in steps],
              "a": [(s, 2.9 - s / 500) for s in steps[:4]],
              "b": [(s, 2.95 - s / 500) for s in steps]}
    report.plot_curves(curves, tmp_path / "g.png", "t", unit="nats/char",
                       groups={"first": ["raw", "a"], "second": ["raw", "a", "b"]})
    (fig,) = figures
    tops = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left") for ax in tops] == ["first", "second"]
    assert "nats/char" in tops[0].get_ylabel()
    color = {ax.get_title(loc="left"): {line.get_label(): line.get_color() for line in ax.lines}
             for ax in tops}
    assert color["first"]["a"] == color["second"]["a"] != color["second"]["b"]
    # the reference is drawn over the x of the curves compared with it: "a" ends at 150
    assert max(tops[0].lines[0].get_xdata()) == 150
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not plotted"):
        report.plot_curves(curves, tmp_path / "h.png", "t", groups={"x": ["raw", "c"]})


def test_a_groups_title_sits_above_its_clipping_note(tmp_path, figures):
    steps = range(0, 500, 50)
    curves = {f"constant LR 0.00{i}, a long label": [(s, 2 + i / 100 - s / 500) for s in steps]
              for i in range(1, 4)}
    curves["diverged"] = [(s, 2 + s / 5) for s in steps]
    report.plot_curves(curves, tmp_path / "g.png", "t",
                       groups={"T = 500: each at its best LR": list(curves)})
    (fig,) = figures
    fig.canvas.draw()
    top = next(ax for ax in fig.axes if ax.get_title(loc="left"))
    notes = [t for t in top.texts if "partly outside" in t.get_text()]
    assert notes
    title = top.title if top.get_title() else top._left_title
    assert not title.get_window_extent().overlaps(notes[0].get_window_extent())


def test_a_sweep_on_a_log_axis_is_labelled_with_its_own_values(tmp_path, figures):
    lrs = [2.5e-3, 5e-3, 1e-2, 2e-2]
    curves = {"cosine": [(lr, 2 + (lr - 0.01) ** 2) for lr in lrs],
              "wsd": [(lr, 1.9 + (lr - 0.01) ** 2) for lr in lrs]}
    report.plot_curves(curves, tmp_path / "s.png", "t", xlabel="peak learning rate",
                       xscale="log", groups={"T = 500": ["cosine", "wsd"]})
    (fig,) = figures
    bottom = [ax for ax in fig.axes if ax.get_xlabel() == "peak learning rate"][0]
    assert bottom.get_xscale() == "log"
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["0.0025", "0.005", "0.01", "0.02"]
    assert not any(t.get_text() for t in bottom.get_xticklabels(minor=True))


def test_a_long_clipping_note_is_wrapped_and_counts_many_curves():
    many = [f"lawa[lawa_interval={d}], LR 0.001" for d in (25, 50, 100, 200, 400)]
    note = report._clip_note(1.71, 3.49, many)
    assert "partly outside: 5 curves" in note
    few = report._clip_note(1.71, 3.49, many[:3])
    assert all(name in few.replace("\n", " ") for name in many[:3])
    assert max(len(line) for line in few.splitlines()) <= 70 < len(few)


def test_sample_takes_nanogpts_start():
    cfg = load_config(sample.SampleConfig, ["--ckpt=x.pt", "--start=ROMEO:"])
    assert cfg.prompt == "ROMEO:"
    with pytest.raises(ConfigError, match="prompt='JULIET:' and start='ROMEO:' are the same"):
        load_config(sample.SampleConfig, ["--ckpt=x.pt", "--start=ROMEO:", "--prompt=JULIET:"])

"""
Post-hoc EMA, validated: the phema of a width reconstructed from the two stored profiles
(EDM2's σ_rel 0.05 and 0.10) against the phema of that width tracked directly, and against a
phema replayed over raw snapshots kept at the same storage cost. docs/results.md reports it.

    python -m experiments.posthoc_validation                     # ~15 min on 2 CPU cores
    python -m experiments.posthoc_validation --max_iters=400 --out_dir=out/phv_short   # a look

1. Train the default model (config/train_shakespeare_char.py: 2000 steps, cosine LR) once, with
   a snapshot every Δ/2 = 50 steps and the post-hoc profiles σ_rel 0.05 and 0.10 (the stored
   pair) plus the targets 0.03, 0.07 and 0.15, all power-function EMAs updated every step
   (train.py's posthoc_sigma_rel). The targets are stored only to be compared against: they
   are the directly tracked EMAs, and the reconstruction never reads them.
2. Reconstruction: average.py --methods=phema --phema_source=profiles over the stored pair at
   every Δ = 100 steps (--posthoc_profiles=[0.05,0.1], the files of multiples of Δ: 2 averages
   per Δ steps), evaluated at every multiple of Δ.
3. Replay at the same storage: average.py --phema_source=snapshots, a phema of each target
   over the raw snapshots every Δ/2 steps (2 snapshots per Δ steps), same τ, same steps.
4. At every evaluated step and for each target: the relative weight error ‖θ − θ_direct‖ /
   ‖θ_direct‖ and the val loss difference L(θ) − L(θ_direct), on average.py's val batches.
   The weights come from the same library code average.py runs (posthoc.Reconstruction, the
   phema averager over the snapshots); the script checks that its losses are average.py's.

Outputs in out_dir: the run, average.py's results, validation.json, and the table (markdown)
and figure (out_dir/posthoc_validation.png; with --publish docs/img/posthoc_validation.png).
"""

import dataclasses
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from averaging import build_averager
from experiments import common
from model import GPT, GPTConfig
from wagpt import checkpoint
from wagpt.atomic import atomic_write
from wagpt.configurator import main
from wagpt.dataloader import EvalBatches, evaluate_loss, open_dataset
from wagpt.flat_params import FlatParameters
from wagpt.commands import run_command
from wagpt.offline_averaging import AverageConfig, average
from wagpt.online_averaging import profile_name
from wagpt.posthoc import Reconstruction, find_stored_profiles
from wagpt.report import markdown_table
from wagpt.runtime import init_runtime

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ValidationConfig:
    out_dir: str = "out/posthoc_validation"   # the run, average.py's outputs, validation.json
    figure: str = "docs/img/posthoc_validation.png"   # where --publish puts the figure;
                                   # without it, out_dir under the same name
    publish: bool = False          # write the figure to docs/img (a given --figure is kept)
    max_iters: int = 2000          # the training run: config/train_shakespeare_char.py's length
    store_every: int = 100         # Δ: the stored pair every Δ steps; raw snapshots every Δ/2
    stored: list[float] = dataclasses.field(default_factory=lambda: [0.05, 0.1])  # the pair
    targets: list[float] = dataclasses.field(default_factory=lambda: [0.03, 0.07, 0.15])
                                   # σ_rel reconstructed: inside and outside the pair
    eval_iters: int = 100          # val batches per evaluation (train.py's default run's)
    table_steps: list[int] = dataclasses.field(default_factory=lambda: [500, 1000, 1500, 2000])
                                   # steps shown in the table (all are in validation.json)
    device: str = "cpu"

    def __post_init__(self):
        if self.store_every % 2 or self.store_every <= 0:
            raise ValueError(f"store_every={self.store_every} must be even and > 0 (raw "
                             f"snapshots are kept every store_every/2 steps)")
        if self.max_iters % self.store_every:
            raise ValueError(f"max_iters={self.max_iters} must be a multiple of store_every")


def run_training(cfg, run):
    if checkpoint.latest_resume(run) is not None:
        return   # trained already
    widths = list(dict.fromkeys(cfg.stored + cfg.targets))
    run_command("train.py", [
        "config/train_shakespeare_char.py", f"--out_dir={run}",
        f"--max_iters={cfg.max_iters}", f"--snapshot_interval={cfg.store_every // 2}",
        f"--posthoc_sigma_rel={widths}", "--averaging=", f"--eval_interval={cfg.max_iters}",
        f"--device={cfg.device}"])


def stored_pair_files(cfg, run):
    """The posthoc files at multiples of Δ (hard links, or copies), in a folder of their own:
    the reconstruction's storage is 2 profiles every Δ steps."""
    folder = Path(cfg.out_dir) / f"posthoc_every_{cfg.store_every}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in checkpoint.list_snapshots(run / "posthoc"):
        step = checkpoint.read_posthoc(path, tensors=False).step
        target = folder / path.name
        if step % cfg.store_every == 0 and not target.exists():
            try:
                target.hardlink_to(path)
            except OSError:
                shutil.copyfile(path, target)
    return folder


def validate(cfg):
    cfg = common.resolve_paths(cfg)
    out = Path(cfg.out_dir)
    run = out / "run"
    run_training(cfg, run)
    folder = stored_pair_files(cfg, run)
    avg = AverageConfig(
        ckpt_dir=str(run / "snapshots"), out_dir=str(out / "average"), methods="phema",
        phema_source="profiles,snapshots", phema_sigma_rel=list(cfg.targets),
        posthoc_dir=str(folder), posthoc_profiles=list(cfg.stored), eval_every=cfg.store_every,
        eval_iters=cfg.eval_iters, device=cfg.device, dataset="shakespeare_char",
        overwrite=True)   # a rerun redoes it
    summary = average(avg)
    losses = {(r["step"], r["setting"]): r["val_loss"] for r in summary["rows"]}
    errors = {(r["step"], r["setting"]): r["reconstruction_error"] for r in summary["rows"]}

    # the weights, with average.py's library pieces
    snapshots = checkpoint.list_snapshots(run / "snapshots")
    first = checkpoint.read_checkpoint(snapshots[0], tensors=False)
    model = GPT(GPTConfig(**{**first.model_args, "dropout": 0.0}))
    flat = FlatParameters(model)
    runtime = init_runtime(cfg.device)
    data = open_dataset(avg.dataset, avg.data_dir)
    batches = EvalBatches(avg.eval_iters, avg.batch_size, first.model_args["block_size"],
                          avg.seed)
    stored = find_stored_profiles([folder], first.model_args, cfg.stored)
    steps = sorted({r["step"] for r in summary["rows"] if r["source"] == "profiles"})
    label = {w: {source: f"phema[phema_source={source},phema_sigma_rel={w:g}]"
                 for source in ("profiles", "snapshots")} for w in cfg.targets}
    targets = {label[w]["profiles"]: build_averager("phema", phema_sigma_rel=w).gamma
               for w in cfg.targets}
    rebuild = Reconstruction(stored.files, targets, steps, stored.tau, stored.phi,
                             lambda path: {name: flat.flat_from_state(state, path) for name,
                                           state in checkpoint.read_posthoc(path).weights.items()})
    replays = {w: build_averager("phema", allow_gaps=True, phema_sigma_rel=w,
                                 phema_update_after=first.step) for w in cfg.targets}
    direct_files = {checkpoint.read_posthoc(p, tensors=False).step: p
                    for p in checkpoint.list_snapshots(run / "posthoc")}

    def loss_of(weights):
        with flat.swapped(weights):
            return evaluate_loss(model, data, batches, runtime, splits=("val",))["val"]

    results = []
    for path in snapshots:
        record = checkpoint.read_checkpoint(path)
        for averager in replays.values():
            averager.update(record.step, flat.flat_from_state(record.weights, path))
        if record.step not in steps:
            continue
        rebuilt = rebuild.at(record.step)
        direct = checkpoint.read_posthoc(direct_files[record.step]).weights
        for w in cfg.targets:
            theta = flat.flat_from_state(direct[profile_name(w)], direct_files[record.step])
            direct_loss = loss_of(theta)
            row = {"step": record.step, "sigma_rel": w, "direct_val_loss": direct_loss,
                   "inside_pair": min(cfg.stored) < w < max(cfg.stored)}
            for source, weights in (("profiles", rebuilt[label[w]["profiles"]]),
                                    ("snapshots", replays[w].average())):
                key = (record.step, label[w][source])
                row[f"{source}_weight_error"] = ((weights - theta).norm() / theta.norm()).item()
                row[f"{source}_val_loss"] = losses[key]
                row[f"{source}_loss_difference"] = losses[key] - direct_loss
            row["profile_error"] = errors[(record.step, label[w]["profiles"])]
            results.append(row)
    # the losses of the weights computed here are average.py's (one check per target)
    for w in cfg.targets:
        check = loss_of(rebuilt[label[w]["profiles"]])
        assert abs(check - losses[(steps[-1], label[w]["profiles"])]) < 1e-6, (w, check)
    table = markdown_table([r for r in results if r["step"] in cfg.table_steps], [
        ("step", "step"), ("σ_rel", lambda r: f"{r['sigma_rel']:g}" +
                           (" (inside)" if r["inside_pair"] else " (outside)")),
        ("weight error, reconstructed", lambda r: f"{r['profiles_weight_error']:.2e}"),
        ("weight error, replayed", lambda r: f"{r['snapshots_weight_error']:.2e}"),
        ("val loss, tracked", lambda r: f"{r['direct_val_loss']:.4f}"),
        ("Δ val loss, reconstructed", lambda r: f"{r['profiles_loss_difference']:+.5f}"),
        ("Δ val loss, replayed", lambda r: f"{r['snapshots_loss_difference']:+.5f}"),
        ("profile error", lambda r: f"{r['profile_error']:.2e}")])
    print(table)
    record = {"config": dataclasses.asdict(cfg), "rows": results, "table": table,
              "storage": {"stored_pair_files": len(stored.files),
                          "raw_snapshots": len(snapshots)}}
    atomic_write(out / "validation.json", json.dumps(record, indent=1))
    figure(cfg, results)
    return record


def figure(cfg, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True)
    for i, w in enumerate(cfg.targets):
        rows = [r for r in results if r["sigma_rel"] == w]
        steps = [r["step"] for r in rows]
        color = f"C{i}"
        for source, style, name in (("profiles", "-", "reconstructed from the stored pair"),
                                    ("snapshots", "--", "replayed over raw snapshots")):
            top.semilogy(steps, [r[f"{source}_weight_error"] for r in rows], style, color=color,
                         marker="o" if source == "profiles" else "s", markersize=3,
                         label=f"σ_rel {w:g}, {name}")
            bottom.plot(steps, [r[f"{source}_loss_difference"] for r in rows], style,
                        color=color, marker="o" if source == "profiles" else "s", markersize=3)
    bottom.axhline(0.0, color="black", linewidth=1)
    top.set_ylabel("‖θ − θ_tracked‖ / ‖θ_tracked‖")
    bottom.set_ylabel("val loss − val loss of θ_tracked")
    bottom.set_xlabel("step")
    top.set_title(f"post-hoc EMA vs the phema tracked directly: stored σ_rel "
                  f"{', '.join(f'{w:g}' for w in cfg.stored)} every {cfg.store_every} steps vs "
                  f"raw snapshots every {cfg.store_every // 2} (same storage)", fontsize=9)
    top.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(cfg.figure, buffer.getvalue())


if __name__ == "__main__":
    main(ValidationConfig, validate, __doc__)

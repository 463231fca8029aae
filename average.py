"""
Offline weight averaging over a saved trajectory: every method and every hyperparameter setting
served from ONE pass over the checkpoints, each evaluated next to the raw weights.

    python average.py --ckpt_dir=out/shakespeare_char/snapshots
    python average.py --ckpt_dir=out/run/snapshots --methods=bema \\
        --bema_ema_power=[0.2,0.5] --bema_bias_power=[-1,0.2,0.4]     # 6 BEMA settings, one pass
    python average.py --ckpt_dir=out/run/snapshots --methods=phema \\
        --phema_sigma_rel=[0.02,0.05,0.1,0.2]          # post-hoc EMAs from the stored profiles
    python average.py --ckpt_dir=out/run/snapshots --save=bema          # + the best BEMA weights
    python average.py config/avg_compare_shakespeare.py                 # a config file, as train.py
    torchrun --standalone --nproc_per_node=8 average.py ...             # the settings over 8 GPUs
    python average.py --help                                            # every key and its default

Any averager key of averaging.py may be given a list; each method runs the cartesian product of
its lists, every combination as its own averager, all fed the same snapshots. The snapshots are
read in step order, each exactly once, one at a time (memory: the model + the averagers' state).
Each method's best setting (and --save=best's) is chosen on held-out val batches (select_iters,
drawn with seed + 1, at the last step and save_step) and reported on the eval batches.

Offline time is training steps (offline_time='steps', the default): an averager acts at the
snapshots it is given, with t = s − τ from the real step s, and a snapshot stands for every
acting step since the previous one, so a setting means what it means in train.py: --ema_decay=
0.999 over snapshots every 50 steps applies 0.999^50 per snapshot and approximates the online
EMA of 0.999 (exact where the weights do not move between snapshots; docs/averaging.md gives
each method's bound). LAWA and windowed averages take each snapshot as one sample (their
intervals and windows are in steps already); phema's decay spans the gap by definition.
offline_time='snapshots' makes each snapshot one update instead (the EMA of 1000 snapshots for
0.999). The burn-in keys (bema_update_after, swa_start, lawa_start, ...) default to the first
snapshot's step and the period keys (swa_freq, lawa_interval, wa_interval, ...) to 1, i.e. every
snapshot; LAWA then averages the k latest snapshots. BEMA's period is part of its estimate (its
schedules count steps: docs/averaging.md), so with time in steps bema_update_freq keeps train.py's
default, 400; a snapshot between acting steps stands for the latest one before it. With a
snapshot at every step and the same keys this is exactly the online averager of train.py
(tests/test_average.py checks it).

Post-hoc EMA: when the run stored power-function EMA profiles beside its snapshots
(train.py's posthoc_sigma_rel, out_dir/posthoc/), `phema` is by default reconstructed from them
(posthoc.Reconstruction: EDM2's least squares over the profiles stored up to each evaluated
step, the synthesis in float64) instead of replayed over the raw snapshots; `phema_source`
chooses, and the setting's label and the `source` column say which it is.

Where the state lives: on the device, or (state_device='host', or 'auto' when the device cannot
hold it) in pinned host memory, updated chunk by chunk through the device (host_state.py), with
the same results. Under torchrun the settings are split over the processes: each reads every
snapshot and updates and evaluates its own settings (the raw weights count as one), and rank 0
gathers the rows and writes the one set of results, equal to one process's.

Outputs in out_dir (never inside ckpt_dir; every file written atomically): results.csv and
results.json (one row per step x setting: val loss; plus what was skipped and why, and the time
spent reading, averaging and evaluating), plot.png (val loss vs step, raw and the best setting
of each method, and every post-hoc phema width), and with --save the averaged weights as a
snapshot that train.py --init_from, evaluation and sampling accept.
"""

from wagpt.configurator import main
from wagpt.offline_averaging import AverageConfig, average

if __name__ == "__main__":
    main(AverageConfig, average, __doc__)

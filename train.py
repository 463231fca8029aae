"""
Train a GPT on one CPU, one GPU, or many GPUs with DDP, with weight averages kept alongside.

    python train.py                     # default: small char model on Shakespeare, CPU ok
    python train.py config/train_shakespeare_char.py --max_iters=500
    torchrun --standalone --nproc_per_node=8 train.py config/train_small.py
    python train.py --help                            # every key, its default and what it does

Every knob is a field of TrainConfig (wagpt/trainer.py), with its default and a comment; config
files and --key=value arguments override them. This file is the loop, top to bottom: setup, then
one step after another with its evaluation, log line and checkpoint. The pieces it calls (the
model and optimizer built from the config, one training step, the Checkpointer that saves and
restores everything as one) are wagpt/trainer.py's, so bench.py, the benchmarks and the tests
use the same ones.
"""

import math
import time
from pathlib import Path

from model import device_peak_flops
from wagpt import schedules
from wagpt.configurator import main
from wagpt.report import format_duration
from wagpt.run_dir import MetricsLog, check_disk, disk_plan, refuse_to_overwrite, save_config
from wagpt.runtime import SAME_FILES, StopSignal, agree, all_reduce_mean, init_runtime
from wagpt.trainer import (Checkpointer, TrainConfig, build, check_shared_out_dir, claimed_out_dir,
                           eval_batches, eval_record, evaluate, format_eval, load_start,
                           lost_contact_reported, micro_steps_per_rank, non_finite_error,
                           open_run_data, seed_step, start_averaging, train_batches, train_step,
                           wrap_model)


def train(cfg):
    """Train as `cfg` says; returns a summary of the end (the tests and the experiments read
    it)."""
    with init_runtime(cfg.device, cfg.dtype, cfg.dist_timeout) as runtime, \
            lost_contact_reported(cfg, runtime):
        # ---- setup: everything that can fail on bad input fails here, before anything is written
        # (on several nodes a file one node cannot see fails there alone: every rank agrees)
        micro_steps_per_rank(cfg, runtime)
        check_shared_out_dir(cfg, runtime)
        cfg, start = agree(runtime, lambda: load_start(cfg), SAME_FILES)   # resume, branch or None
        # the start file's data unless told otherwise
        data = agree(runtime, lambda: open_run_data(cfg, start), SAME_FILES)
        if cfg.init_from != "resume" and not cfg.eval_only:
            refuse_to_overwrite(cfg.out_dir)
        run = build(cfg, runtime, data)        # model, optimizer, averages, post-hoc profiles
        checkpointer = Checkpointer(run, cfg, runtime)
        checkpointer.load(start)              # every component's state, bit for bit
        state = run.state
        if cfg.eval_only:   # the start point: raw weights and the averages it holds; no writes
            losses = evaluate(run.model, run.online, data, eval_batches(cfg), runtime)
            if runtime.master:
                print(format_eval(state.iter_num, losses))
            return {"iter_num": state.iter_num, "stopped_by": "eval_only", "checkpoint": None,
                    "val_loss": losses["val"], "train_loss": losses["train"],
                    "val_loss_averaged": losses["averaged"]}
        start_averaging(run, cfg)             # the averages whose burn-in is this step
        disk = disk_plan(cfg, run.flat.buffer.numel(), state.iter_num)   # what it will write:
        free = agree(runtime, lambda: check_disk(disk, cfg.out_dir))    # refused if too much
        log = MetricsLog(cfg, runtime.master)
        log.check()

        with claimed_out_dir(cfg, runtime, log, state.iter_num, checkpointer.identity["id"]), \
                StopSignal(runtime) as stop:
            model = wrap_model(run.model, cfg, runtime)
            eval_model = model.module if runtime.ddp else model   # no collectives in forward
            schedule = schedules.from_config(cfg)
            evals = eval_batches(cfg)
            tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
            peak_flops = device_peak_flops(runtime.device, cfg.peak_flops)
            out_dir = Path(cfg.out_dir)
            if runtime.master:
                save_config(cfg, out_dir / "config.json", run=checkpointer.identity)
                print(f"{run.model.num_params() / 1e6:.2f}M parameters, {tokens_per_iter:,} "
                      f"tokens/step, start at step {state.iter_num} "
                      f"({start.path if start else 'scratch'}), device {runtime.device}, "
                      f"world size {runtime.world_size}, run {checkpointer.identity['id']}")
                if run.online.names:
                    print(f"averaging {', '.join(run.online.names)}: "
                          f"{run.online.memory_bytes() / 2**20:.1f} MiB of state per rank")
                print(disk.describe(out_dir, free))
                if run.posthoc.names:
                    print(f"post-hoc EMA profiles {', '.join(run.posthoc.names)} (from step "
                          f"{cfg.posthoc_update_after}, every {cfg.posthoc_update_freq} steps): "
                          f"written with every snapshot to {out_dir / 'posthoc'}, "
                          f"{len(run.posthoc.names)}x a snapshot's size")
            log.open(state.iter_num)
            batches = train_batches(data, cfg, runtime, state.iter_num)
            loss, losses, stopped_by = None, None, None
            if cfg.snapshot_interval and state.iter_num == 0:
                checkpointer.save_snapshot()   # θ_0: offline averages may start there too
            timer, timed_steps = time.perf_counter(), 0

            while state.iter_num < cfg.max_iters:
                if state.iter_num % cfg.eval_interval == 0:
                    losses = evaluate(eval_model, run.online, data, evals, runtime)
                    if runtime.master:
                        print(format_eval(state.iter_num, losses))
                    log.write(eval_record(state.iter_num, state.tokens_seen, losses))
                    timer, timed_steps = time.perf_counter(), 0  # keep eval out of ms/iter

                # one optimizer step, then the averages of its weights θ_s (s = steps done)
                seed_step(cfg, runtime, state.iter_num)
                lr = cfg.learning_rate * schedule(state.iter_num)
                loss = train_step(model, run.optimizer, batches, cfg, runtime, lr)
                state.iter_num += 1
                state.tokens_seen += tokens_per_iter
                timed_steps += 1
                run.online.update(state.iter_num)   # each acts where it is due
                run.posthoc.update(state.iter_num)

                if cfg.snapshot_interval and state.iter_num % cfg.snapshot_interval == 0:
                    checkpointer.save_snapshot(averaged=cfg.save_averaged, loss=loss)
                if state.iter_num % cfg.log_interval == 0:
                    mean_loss = all_reduce_mean(loss, runtime)   # the one host sync per log line
                    if not math.isfinite(mean_loss):
                        raise non_finite_error(f"the training loss is {mean_loss}",
                                               state.iter_num, out_dir)
                    elapsed = time.perf_counter() - timer
                    ms = 1000 * elapsed / timed_steps
                    mfu = None if peak_flops is None else run.model.estimate_mfu(
                        tokens_per_iter * timed_steps / elapsed, peak_flops)
                    if runtime.master:
                        mfu_text = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
                        eta = format_duration((cfg.max_iters - state.iter_num) * ms / 1000)
                        print(f"iter {state.iter_num}: loss {mean_loss:.4f}, lr {lr:.2e}, "
                              f"{ms:.1f} ms/iter, {tokens_per_iter * 1000 / ms:,.0f} tok/s, "
                              f"mfu {mfu_text}, eta {eta}")
                    log.write({"iter": state.iter_num, "lr": lr, "loss": mean_loss,
                               "tokens": state.tokens_seen, "ms_per_iter": ms, "mfu": mfu})
                    timer, timed_steps = time.perf_counter(), 0
                if state.iter_num % cfg.ckpt_interval == 0 and state.iter_num < cfg.max_iters:
                    checkpointer.save(loss)
                if stop.poll():   # every rank stops at the same step, within two of a signal
                    stopped_by = stop.requested or "signal"
                    break
                if cfg.stop_iter is not None and state.iter_num >= cfg.stop_iter:
                    stopped_by = "stop_iter"
                    break

            if stopped_by is None:   # the schedule is done: a final evaluation
                losses = evaluate(eval_model, run.online, data, evals, runtime)
                if runtime.master:
                    print(format_eval(state.iter_num, losses))
                log.write(eval_record(state.iter_num, state.tokens_seen, losses))
                if cfg.save_averaged and not (cfg.snapshot_interval and
                                              state.iter_num % cfg.snapshot_interval == 0):
                    checkpointer.save_snapshot(raw=False, averaged=True, loss=loss)
            path = checkpointer.save(loss)
            if runtime.master:
                how = f"stopped by {stopped_by}" if stopped_by else "done"
                print(f"{how} at step {state.iter_num}; resume checkpoint {path}")
    return {"iter_num": state.iter_num, "stopped_by": stopped_by, "checkpoint": path,
            "val_loss": losses["val"] if losses else None,
            "train_loss": losses["train"] if losses else None,
            "val_loss_averaged": losses["averaged"] if losses else {}}


if __name__ == "__main__":
    main(TrainConfig, train, __doc__)

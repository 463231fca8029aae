"""Several nodes, simulated on one machine: two torchrun launchers that meet through the c10d
rendezvous (`--nnodes=2 --rdzv_backend=c10d`), one gloo process each, as README.md's multi-node
recipe starts them on two machines. Training equals one process with the same global batch and
resumes on another node count; only rank 0 writes into out_dir; nodes that see different
out_dirs, a frozen node, and average.py over two nodes."""

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.distributed.run import get_args_parser

import average
import train
from wagpt import checkpoint, run_dir
from wagpt.offline_averaging import AverageConfig
from wagpt.run_dir import OutDirError
from wagpt.runtime import LostContact, Runtime, lost_contact
from wagpt.trainer import NonFiniteLossError, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models

REPO = Path(__file__).resolve().parent.parent
# 2 ranks x 1 micro-step = 1 process x 2 micro-steps; every averager kind, sharded over the ranks;
# a snapshot (and the post-hoc profiles) at every step
RUN = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=2,
           device="cpu", learning_rate=1e-2, min_lr=1e-3, warmup_iters=2,
           gradient_accumulation_steps=2, max_iters=6, eval_interval=3, log_interval=1,
           ckpt_interval=3, averaging="ema,bema,lawa,swa", lawa_interval=2, lawa_k=2,
           ema_update_after=0, snapshot_interval=1)


def flags(settings):
    return [f"--{key}={value}" for key, value in settings.items()]


def free_port():
    """A port nothing listens on now (the kernel's pick for port 0); the first launcher binds it
    for the rendezvous a moment later."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nodes:
    """`nnodes` torchrun launchers of one job, each in its own working directory (a relative
    out_dir is then each node's own disk), their output in files. On exit every process left
    (the launchers and their workers, which torchrun starts in sessions of their own, found by
    an environment variable they inherit) is killed, so a failing or timed-out test leaves
    nothing running."""

    def __init__(self, script, args, cwds, nproc_per_node=1):
        port = free_port()
        self.job = f"{port}-{os.getpid()}"
        self.cwds = [Path(c) for c in cwds]
        self.launchers = []
        try:
            for i, cwd in enumerate(self.cwds):
                cwd.mkdir(parents=True, exist_ok=True)
                command = [sys.executable, "-m", "torch.distributed.run",
                           f"--nnodes={len(cwds)}", f"--nproc_per_node={nproc_per_node}",
                           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                           f"--rdzv_id=test{port}",
                           f"--log-dir={self.log(i, 'torchrun')}",   # not a folder in /tmp
                           str(REPO / script), *args]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                       "WA_TEST_NODE": f"{self.job}:{i}"}
                with open(self.log(i, "out"), "w") as out, open(self.log(i, "err"), "w") as err:
                    self.launchers.append(subprocess.Popen(
                        command, cwd=cwd, env=env, stdout=out, stderr=err,
                        start_new_session=True))
        except BaseException:
            self.__exit__()
            raise

    def log(self, i, kind):
        return self.cwds[i].parent / f"{self.cwds[i].name}.{kind}"

    def text(self, i, kind):
        return self.log(i, kind).read_text()

    def wait(self, timeout, only=None):
        """The launchers' exit statuses (fails the test when they run past `timeout` s)."""
        deadline = time.time() + timeout
        return [self.launchers[i].wait(timeout=max(0.1, deadline - time.time()))
                for i in (range(len(self.launchers)) if only is None else only)]

    def wait_for(self, pattern, timeout=120):
        """The node whose stdout shows `pattern` first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for i in range(len(self.launchers)):
                if re.search(pattern, self.text(i, "out"), re.M):
                    return i
            if all(p.poll() is not None for p in self.launchers):
                break
            time.sleep(0.1)
        pytest.fail(f"no {pattern!r} in the nodes' output: " +
                    " | ".join(self.text(i, "err")[-1500:] for i in range(len(self.launchers))))

    def workers(self):
        """{rank: (node, pid)} of this job's workers alive now."""
        found = {}
        for proc in Path("/proc").iterdir():
            try:
                environ = dict(v.split(b"=", 1) for v in
                               (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
            except OSError:   # gone, or not ours
                continue
            node = environ.get(b"WA_TEST_NODE", b"").decode()
            if node.startswith(self.job + ":") and b"RANK" in environ:   # launchers have none
                found[int(environ[b"RANK"])] = (int(node.split(":")[1]), int(proc.name))
        return found

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for _, pid in self.workers().values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for launcher in self.launchers:
            if launcher.poll() is None:
                launcher.kill()
            launcher.wait()


@pytest.fixture(scope="module")
def two_nodes(tiny_data_dir, tmp_path_factory):
    """Steps 1..3 of a 6-step run on two nodes whose out_dir is each node's own folder (the
    relative --out_dir=out in two working directories): the node of rank 0, where every file
    is, and the other."""
    root = tmp_path_factory.mktemp("two_nodes")
    with Nodes("train.py", [f"--data_dir={tiny_data_dir}", "--out_dir=out", *flags(RUN),
                            "--stop_iter=3"], [root / "a", root / "b"]) as nodes:
        assert nodes.wait(timeout=240) == [0, 0], nodes.text(0, "err")[-3000:]
        first = next(i for i in (0, 1) if "world size 2" in nodes.text(i, "out"))
        assert "stopped by stop_iter at step 3" in nodes.text(first, "out")
        return {"rank0": nodes.cwds[first], "other": nodes.cwds[1 - first], "root": root}


def history(out_dir):
    """metrics.jsonl without the timings."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("ms_per_iter", "mfu")}
            for line in open(Path(out_dir) / "metrics.jsonl")]


def assert_close_records(a, b):
    """The same records, numbers equal to float32 rounding (a mean over ranks is summed in
    another order)."""
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-6)


def assert_same_state(a, b):
    """Two resume checkpoints hold the same weights, optimizer, averager and post-hoc profile
    state, bit for bit."""
    assert a.step == b.step
    assert a.weights.keys() == b.weights.keys()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    for part in ("optimizer", "averaging", "posthoc"):
        x, y = getattr(a, part), getattr(b, part)
        flat_x, flat_y = [], []
        for record, flat in ((x, flat_x), (y, flat_y)):
            pending = [record]
            while pending:
                item = pending.pop()
                if isinstance(item, dict):
                    pending += [item[k] for k in sorted(item, key=str)]
                elif isinstance(item, (list, tuple)):
                    pending += list(item)
                else:
                    flat.append(item)
        assert len(flat_x) == len(flat_y), part
        for u, v in zip(flat_x, flat_y):
            assert (torch.equal(u, v) if torch.is_tensor(u) else u == v), part


def safetensors_files(directory):
    """{name: (metadata, tensors)} of the .safetensors files in `directory` (compared by content:
    the order of the metadata in the file is not fixed)."""
    found = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            found[path.name] = (f.metadata(), {k: f.get_tensor(k) for k in f.keys()})
    return found


RUN_SPECIFIC = ("run", "checksum")   # the run id, and the checksum that covers it


def assert_same_files(a, b):
    """The same files with the same tensors and metadata, but for what names the run (each run
    has an id of its own)."""
    assert a.keys() == b.keys()
    for name in a:
        strip = lambda meta: {k: v for k, v in meta.items() if k not in RUN_SPECIFIC}  # noqa: E731
        assert strip(a[name][0]) == strip(b[name][0]), name
        assert "run" in a[name][0] and "run" in b[name][0], name
        assert a[name][1].keys() == b[name][1].keys()
        assert all(torch.equal(t, b[name][1][k]) for k, t in a[name][1].items()), name


def digest(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file() and p.name != ".lock"}


# ---------------------------------------------------------------------------------------------
# training

def test_two_nodes_train_as_one_process_and_resume_on_one_node(two_nodes, tiny_data_dir,
                                                               tmp_path):
    """The same global batch gives the same run: 2 nodes x 1 micro-step equal 1 process x 2
    micro-steps, and a run stopped on 2 nodes resumes on 1. For two ranks it is exact: DDP
    divides each rank's gradient by 2 (exact in floating point) and a sum of two does not depend
    on its order, so the weights, the optimizer, the sharded averagers and the snapshots equal
    one process's bit for bit; the logged losses are means over ranks, equal to rounding. (More
    ranks sum in another order: equal to float32 rounding.)"""
    rank0, other = two_nodes["rank0"], two_nodes["other"]
    # only rank 0 writes: the other node's working directory holds nothing at all
    assert list(other.iterdir()) == []
    one = tmp_path / "one"
    train.train(TrainConfig(data_dir=str(tiny_data_dir), out_dir=str(one), **RUN))
    assert_same_state(checkpoint.read_checkpoint(rank0 / "out" / "ckpt_0000003.pt"),
                      checkpoint.read_checkpoint(one / "ckpt_0000003.pt"))
    for kind, steps in (("snapshots", range(4)), ("posthoc", range(1, 4))):
        files = safetensors_files(rank0 / "out" / kind)
        assert list(files) == [f"step_{s:07d}.safetensors" for s in steps]
        assert_same_files(files, {k: v for k, v in safetensors_files(one / kind).items()
                                  if k in files})
    two = history(rank0 / "out")
    assert [r["iter"] for r in two] == [0, 1, 2, 3]   # stop_iter: no eval at step 3
    assert_close_records(two, history(one)[:4])
    # resume on one node (one process) from what the two nodes saved: the uninterrupted run
    resumed = tmp_path / "resumed"
    shutil.copytree(rank0 / "out", resumed)
    train.train(TrainConfig(data_dir=str(tiny_data_dir), out_dir=str(resumed),
                            init_from="resume", **RUN))
    assert_same_state(checkpoint.read_checkpoint(resumed / "ckpt_0000006.pt"),
                      checkpoint.read_checkpoint(one / "ckpt_0000006.pt"))
    for kind in ("snapshots", "posthoc"):
        assert_same_files(safetensors_files(resumed / kind), safetensors_files(one / kind))
    assert_close_records(history(resumed), history(one))


def test_nodes_that_see_different_out_dirs_cannot_resume(two_nodes, tiny_data_dir, tmp_path):
    """A resume reads the checkpoint on every node: when a node sees another newest checkpoint
    in out_dir (here none: each node's out_dir is its own folder), every rank stops before
    anything is written, with one line naming both views and the fix."""
    nodes_dir = tmp_path / "nodes"
    shutil.copytree(two_nodes["root"], nodes_dir, ignore=shutil.ignore_patterns("*.out", "*.err"))
    before = [digest(nodes_dir / node) for node in "ab"]
    with Nodes("train.py", [f"--data_dir={tiny_data_dir}", "--out_dir=out", *flags(RUN),
                            "--init_from=resume"], [nodes_dir / "a", nodes_dir / "b"]) as nodes:
        assert nodes.wait(timeout=240) == [1, 1]   # torchrun's status when a worker fails
        errors = [line for i in (0, 1) for line in nodes.text(i, "err").splitlines()
                  if line.startswith("error: ")]
    assert len(errors) == 1, errors
    assert re.match(r"error: rank 1 on \S+ sees (ckpt_0000003\.pt|no resume checkpoint) as the "
                    r"newest in out, rank 0 on \S+ sees (none|ckpt_0000003\.pt): out_dir must be "
                    r"one file system that every node mounts at the same path", errors[0])
    assert [digest(nodes_dir / node) for node in "ab"] == before   # nothing written or lost


def test_a_frozen_node_stops_the_others_within_dist_timeout(tiny_data_dir, tmp_path):
    """A node that stops answering (frozen, cut off) closes no connection: the others would wait
    at the next collective for torch's default timeout (gloo: 30 minutes). With --dist_timeout
    they stop after it with one line each, naming the newest resume checkpoint, which loads.
    Rank 0 is the frozen one, so the line must come from another rank."""
    out = tmp_path / "shared"
    args = [f"--data_dir={tiny_data_dir}", f"--out_dir={out}", *flags(RUN), "--max_iters=100000",
            "--eval_interval=100000", "--ckpt_interval=2", "--snapshot_interval=0",
            "--dist_timeout=3"]
    with Nodes("train.py", args, [tmp_path / "a", tmp_path / "b"]) as nodes:
        nodes.wait_for(r"^iter 5:")
        workers = nodes.workers()
        frozen_node, frozen = workers[0]
        os.kill(frozen, signal.SIGSTOP)
        frozen_at = time.time()
        survivor = 1 - frozen_node
        assert nodes.wait(timeout=60, only=[survivor]) == [1]
        took = time.time() - frozen_at
        errors = [line for line in nodes.text(survivor, "err").splitlines()
                  if line.startswith("error: ")]
        newest = checkpoint.latest_resume(out)
        os.kill(frozen, signal.SIGKILL)   # the frozen node's launcher then ends too
        assert nodes.wait(timeout=60, only=[frozen_node]) == [1]
    assert took < 3 + 15, took
    assert len(errors) == 1, nodes.text(survivor, "err")[-3000:]
    assert re.match(r"error: rank 1 on \S+ lost contact with the other processes of the run: one "
                    r"died or did not answer within 3 s \(.+\)\. The "
                    r"newest resume checkpoint is (\S+): start every node again with "
                    r"--init_from=resume$", errors[0]), errors[0]
    assert errors[0].split("checkpoint is ")[1].split(":")[0] == str(newest)
    for path in checkpoint.list_resume_checkpoints(out):   # every one whole and finite
        assert all(torch.isfinite(t).all() for t in checkpoint.read_checkpoint(path).tensors())


def test_dist_timeout_is_a_positive_number_of_seconds(make_config):
    with pytest.raises(ValueError, match=r"dist_timeout=0 must be > 0 \(seconds\)"):
        make_config(dist_timeout=0)


def test_only_a_collectives_failure_is_a_lost_contact():
    ddp = Runtime(torch.device("cpu"), rank=1, world_size=2)
    reset = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                         "[10.0.0.2]:4242: Connection reset by peer. This is typically caused by "
                         "a remote worker hanging or bugs in the application.")
    lost = lost_contact(reset, ddp, 600)
    assert isinstance(lost, LostContact) and lost.every_node
    assert re.match(r"rank 1 on \S+ lost contact with the other processes of the run: one died or "
                    r"did not answer within 600 s \(Read error \[10.0.0.2\]:4242: Connection "
                    r"reset by peer; the other nodes' logs say which\)\.$", str(lost)), str(lost)
    for message in ("Application timeout caused pair closure",   # what gloo says, ...
                    "[../gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 600000ms "
                    "for recv operation to complete",
                    "NCCL communicator was aborted on rank 1."):   # ... and NCCL
        assert isinstance(lost_contact(RuntimeError(message), ddp, 600), LostContact), message
    assert lost_contact(reset, Runtime(torch.device("cpu")), 600) is None   # one process
    assert lost_contact(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ddp, 600) \
        is None   # a bug keeps its traceback
    assert lost_contact(ValueError("gloo"), ddp, 600) is None
    assert lost_contact(NonFiniteLossError("... raise --dist_timeout ..."), ddp, 600) \
        is None   # the run's own errors stay as they are


def test_an_out_dir_that_cannot_be_locked_is_one_clear_error(make_config, monkeypatch):
    """A shared file system without flock (Lustre mounted without -o flock says ENOSYS): one
    line naming the lock file and the fix, before anything is written."""
    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    monkeypatch.setattr(run_dir.fcntl, "flock", no_flock)
    cfg = make_config()
    with pytest.raises(OutDirError, match=r"cannot lock \S+/\.lock: Function not implemented; the "
                       r"file system of out_dir does not support flock \(Lustre: mount it with "
                       r"-o flock\)"):
        train.train(cfg)
    assert sorted(p.name for p in Path(cfg.out_dir).iterdir()) == [".lock"]


def test_the_slurm_script_starts_one_torchrun_per_node_with_the_first_as_endpoint(tmp_path):
    """examples/slurm/train_multinode.sbatch with stand-ins for srun and scontrol: the command it
    gives srun (run once per node) is the rendezvous the tests above use, and torchrun accepts
    it."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text('#!/bin/sh\nprintf "gpu-a17\\ngpu-a18\\n"\n')
    (stubs / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "73021",
           "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_GPUS_ON_NODE": "4", "SRUN_ARGS": str(tmp_path / "srun_args")}
    result = subprocess.run(["bash", "examples/slurm/train_multinode.sbatch",
                             "config/train_small.py", "--init_from=resume"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert args == ["--kill-on-bad-exit=0", "--wait=120", "torchrun", "--nnodes=2",
                    "--nproc_per_node=4", "--rdzv_backend=c10d",
                    "--rdzv_endpoint=gpu-a17:33021",   # 20000 + the job id modulo 20000
                    "--rdzv_id=73021", "train.py", "config/train_small.py", "--init_from=resume"]
    parsed = get_args_parser().parse_args(args[3:])
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_backend, parsed.rdzv_endpoint,
            parsed.training_script, parsed.training_script_args) == \
        ("2", "4", "c10d", "gpu-a17:33021", "train.py", ["config/train_small.py",
                                                         "--init_from=resume"])


# ---------------------------------------------------------------------------------------------
# offline averaging

def test_average_over_two_nodes_gives_one_process_results(two_nodes, tiny_data_dir, tmp_path):
    """average.py under the same rendezvous: the settings split over the two nodes' ranks, rank
    0 writes results.csv/json equal to one process's, row for row, and the --save'd average."""
    settings = dict(ckpt_dir=str(two_nodes["rank0"] / "out" / "snapshots"),
                    data_dir=str(tiny_data_dir), eval_iters=2, batch_size=4, device="cpu",
                    plot=False, methods="ema,bema,lawa,phema", ema_decay=[0.5, 0.8],
                    lawa_k=[2, 3], save="best")
    average.average(AverageConfig(out_dir=str(tmp_path / "one"), **settings))
    args = [f"--{k}={str(v).replace(' ', '')}" for k, v in settings.items()]
    with Nodes("average.py", [*args, f"--out_dir={tmp_path / 'two'}"],
               [tmp_path / "a", tmp_path / "b"]) as nodes:
        assert nodes.wait(timeout=240) == [0, 0], nodes.text(0, "err")[-3000:]
        assert "over 2 processes" in nodes.text(0, "out") + nodes.text(1, "out")
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert a["rows"] == b["rows"] and a["best"] == b["best"]
    assert {r["method"] for r in a["rows"]} == {"raw", "ema", "bema", "lawa", "phema"}
    assert (tmp_path / "one" / "results.csv").read_text() == \
        (tmp_path / "two" / "results.csv").read_text()
    assert a["saved"] == {**b["saved"], "path": b["saved"]["path"].replace("/two/", "/one/")}
    x, y = (checkpoint.read_checkpoint(p["saved"]["path"]).weights for p in (a, b))
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_average_where_one_node_cannot_read_ckpt_dir_is_one_clear_error(two_nodes,
                                                                       tiny_data_dir, tmp_path):
    """Every rank reads every snapshot: when one node lacks ckpt_dir (a relative path, here in
    each node's own working directory), every rank stops at once with one line naming the rank,
    its host and the fix (before, that rank exited alone and the others waited for it)."""
    shutil.copytree(two_nodes["rank0"] / "out" / "snapshots", tmp_path / "a" / "snaps")
    with Nodes("average.py", ["--ckpt_dir=snaps", f"--out_dir={tmp_path / 'avg'}",
                              f"--data_dir={tiny_data_dir}", "--device=cpu", "--methods=ema"],
               [tmp_path / "a", tmp_path / "b"]) as nodes:
        assert nodes.wait(timeout=60) == [1, 1]
        errors = [line for i in (0, 1) for line in nodes.text(i, "err").splitlines()
                  if line.startswith("error: ")]
    assert len(errors) == 1, errors
    assert re.match(r"error: rank [01] on \S+: checkpoint directory snaps does not exist \(rank "
                    r"[01] on \S+ had no such error; every node must see the same files at the "
                    r"same paths\)$", errors[0]), errors[0]
    assert not (tmp_path / "avg").exists()

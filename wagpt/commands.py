"""
The repository's commands: the one table of them (the layout and command-line tests and the
README's file map read it), and how a script of this repository runs one as a process.

    run_command("train.py", ["--max_iters=100", "--out_dir=out/x"])   # from the repository root

Commands are the thin scripts at the top of the repository; everything they share is in this
package. A command imports the library, never another command.
"""

import subprocess
import sys
from pathlib import Path

from wagpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]

COMMANDS = {   # script at the repository root: what it does
    "train.py": "train a GPT (CPU, GPU, DDP), with weight averages kept alongside",
    "average.py": "offline averaging over saved checkpoints, every method and sweep in one pass",
    "eval_ckpt.py": "loss, perplexity and embedding metrics of any checkpoint",
    "sample.py": "text from any checkpoint",
    "export_hf.py": "any checkpoint as a transformers GPT2LMHeadModel folder",
    "bench.py": "training throughput (ms/iter, tokens/s, MFU) of any config",
}


def run_command(script, args=(), quiet=False):
    """Run `python <script> <args>` from the repository root, as a user would; its output goes
    to this process's (stdout dropped when quiet). A failure is a UserError naming the command
    and the last line it printed on stderr."""
    if script not in COMMANDS:
        raise ValueError(f"{script} is not one of the commands {', '.join(COMMANDS)}")
    argv = [sys.executable, script, *map(str, args)]
    result = subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL if quiet else None,
                            stderr=subprocess.PIPE, text=True)
    if result.stderr and not quiet:
        sys.stderr.write(result.stderr)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        raise UserError(f"`python {script} {' '.join(map(str, args))}` failed (exit status "
                        f"{result.returncode}): {last}")
    return result

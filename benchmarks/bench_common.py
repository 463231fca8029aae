"""
What every benchmark records with its figures: when, on what, with which software, so that a line
of results can be traced to its machine (docs/benchmarks.md quotes these fields).

    result = {**machine_info(device), "rows": rows}
    append_jsonl(cfg.bench_out, result)          # report.py: one JSON line per run
"""

import datetime
import os
import platform
from pathlib import Path

import torch


def cpu_name():
    """The CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device="cpu"):
    """{date (UTC), device ('cpu' or the GPU's name), cpu (model and core count), torch, triton,
    threads, python}."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": name, "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "triton": triton_version,
            "threads": torch.get_num_threads(), "python": platform.python_version()}

"""
Training throughput of a config: ms/iter, tokens/s and MFU, after warm-up, no eval or checkpoints.

    python bench.py                     # the default Shakespeare config on this machine
    python bench.py config/train_small.py --compile=True --bench_iters=50
    torchrun --standalone --nproc_per_node=8 bench.py config/train_small.py

It runs the same train_step as train.py on the same batches, so what it measures is what training
pays per step. Results go to stdout, and as one JSON line to --bench_out if given.
"""

from wagpt.configurator import main
from wagpt.throughput import BenchConfig, measure_throughput

if __name__ == "__main__":
    main(BenchConfig, measure_throughput, __doc__)

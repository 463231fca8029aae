"""The data of shakespeare_cloze.yaml: the JSONL file beside this one, as the "test" split.

lm-evaluation-harness calls load() (the YAML's `custom_dataset`); reading the file relative to
this module, not the working directory, lets `--include_path examples/lm_eval` work from
anywhere. Each line: {"context": str, "choices": [4 words], "label": index of the right one}.
"""

import json
from pathlib import Path

DATA = Path(__file__).resolve().with_suffix(".jsonl")


def load(**kwargs):   # lm-eval passes the task's metadata as keyword arguments; none are needed
    import datasets
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})   # no cache files

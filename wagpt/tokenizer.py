"""
The tokenizer of a model, from its vocabulary size and the dataset it was trained on.

    tokenizer = load_tokenizer(vocab_size, dataset="shakespeare_char")
    tokenizer = checkpoint_tokenizer(record)     # a checkpoint's: the characters it records
    ids = tokenizer.encode("ROMEO:"); text = tokenizer.decode(ids)

A vocabulary of GPT2_VOCAB_SIZE (50257) tokens or more is GPT-2 BPE (tiktoken, with data/common.py's
offline copy of the ranks; 50304 = 50257 padded for speed). A smaller one is character level:
id i is the i-th character of the `chars` in the dataset's meta.json (data/common.py's layout).
"""

import json

from wagpt.dataloader import (  # GPT-2 BPE: 50256 merges + bytes + <|endoftext|>
    GPT2_VOCAB_SIZE, checkpoint_dataset, dataset_dir)
from wagpt.errors import ConfigError


class CharTokenizer:
    """Id i is chars[i] (data/common.py's meta.json layout)."""

    def __init__(self, chars, source):
        self.chars, self.source = chars, source
        self.index = {c: i for i, c in enumerate(chars)}

    def encode(self, text):
        for c in text:
            if c not in self.index:
                raise ConfigError(f"prompt character {c!r} (U+{ord(c):04X}) is not in the "
                                  f"vocabulary of {self.source} ({len(self.chars)} characters: "
                                  f"{''.join(self.chars)!r}); change the prompt")
        return [self.index[c] for c in text]

    def decode(self, ids):
        # a padding row past the vocabulary is no character (U+FFFD marks one if ever sampled)
        return "".join(self.chars[i] if i < len(self.chars) else "\ufffd" for i in ids)


class GPT2BPETokenizer:
    def __init__(self):
        from wagpt.corpora import (
            gpt2_encoding,  # tiktoken, else the pinned offline ranks
        )
        self.encoding = gpt2_encoding()

    def encode(self, text):
        return self.encoding.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids):
        # ids past 50256 are the padding rows of a 50304 vocab: no text (U+FFFD marks one);
        # bytes are joined before decoding, as a character may span several tokens
        pieces = [self.encoding.decode_single_token_bytes(i) if i < self.encoding.n_vocab
                  else "\ufffd".encode() for i in ids]
        return b"".join(pieces).decode("utf-8", errors="replace")


def data_meta(dataset, data_dir=None):
    """(meta.json dict or None, its path) of a prepared dataset."""
    path = dataset_dir(dataset, data_dir) / "meta.json"
    return (json.loads(path.read_text()) if path.is_file() else None), path


def checkpoint_tokenizer(record, dataset=None, data_dir=None):
    """The tokenizer of the checkpoint `record` (checkpoint.Checkpoint): GPT-2 BPE for a
    GPT-2-sized vocabulary; else the characters of the dataset given (`dataset` / `data_dir`,
    None when not given), which must be those the checkpoint records, or else the characters
    the checkpoint records, or else those of the dataset it records (or shakespeare_char)."""
    vocab_size = record.model_args["vocab_size"]
    chars, source = model_chars(record, dataset, data_dir)
    return GPT2BPETokenizer() if vocab_size >= GPT2_VOCAB_SIZE else CharTokenizer(chars, source)


def model_chars(record, dataset=None, data_dir=None):
    """(chars, where they come from) of a character-level checkpoint (checkpoint_tokenizer);
    (None, None) for a GPT-2 BPE one."""
    vocab_size = record.model_args["vocab_size"]
    if vocab_size >= GPT2_VOCAB_SIZE:
        return None, None
    recorded = (record.data or {}).get("chars")
    if recorded and dataset is None and data_dir is None:
        return recorded, f"{record.path} (its training data's {len(recorded)} characters)"
    dataset, data_dir, _ = checkpoint_dataset(record.data, dataset, data_dir)
    tokenizer = load_tokenizer(vocab_size, dataset, data_dir)
    if recorded and tokenizer.chars != recorded:
        raise ConfigError(f"{tokenizer.source} lists other characters than the data "
                          f"{record.path} was trained on ({len(tokenizer.chars)} vs "
                          f"{len(recorded)}); drop --dataset/--data_dir to use the checkpoint's")
    return tokenizer.chars, tokenizer.source


def load_tokenizer(vocab_size, dataset="shakespeare_char", data_dir=None):
    """The tokenizer of a model with `vocab_size` rows (see the module docstring)."""
    if vocab_size >= GPT2_VOCAB_SIZE:
        return GPT2BPETokenizer()
    meta, path = data_meta(dataset, data_dir)
    if meta is None or meta.get("tokenizer") != "char" or "chars" not in meta:
        found = "is missing" if meta is None else f"has tokenizer {meta.get('tokenizer')!r}"
        raise ConfigError(f"the model has a {vocab_size}-token vocabulary, so it is character "
                          f"level, but {path} {found}; pass the dataset it was trained on "
                          f"(--dataset=NAME or --data_dir=PATH, whose meta.json lists its "
                          f"chars)")
    if len(meta["chars"]) > vocab_size:
        raise ConfigError(f"{path} lists {len(meta['chars'])} characters but the model has "
                          f"only {vocab_size} tokens: it was trained on another dataset; pass "
                          f"that one")
    return CharTokenizer(meta["chars"], path)

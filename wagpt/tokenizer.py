"""
The tokenizer of a model, from its vocabulary size and the dataset it was trained on.

    tokenizer = load_tokenizer(vocab_size, dataset="shakespeare_char")
    ids = tokenizer.encode("ROMEO:"); text = tokenizer.decode(ids)

A vocabulary of GPT2_VOCAB_SIZE (50257) tokens or more is GPT-2 BPE (tiktoken, with data/common.py's
offline copy of the ranks; 50304 = 50257 padded for speed). A smaller one is character level:
id i is the i-th character of the `chars` in the dataset's meta.json (data/common.py's layout).
"""

import json

from wagpt.dataloader import dataset_dir
from wagpt.errors import ConfigError

GPT2_VOCAB_SIZE = 50257   # GPT-2 BPE's 50256 merges and bytes + <|endoftext|>


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

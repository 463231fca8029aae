"""wagpt/dataloader.py: the sampler is a pure function of its seed; bad data is caught up front."""


import pytest

from wagpt.dataloader import DataError, TokenDataset, get_batch, micro_batch_seed


def test_batches_are_pure_functions_of_the_seed(tiny_data_dir):
    data = TokenDataset(tiny_data_dir)
    tokens = data.splits["train"]
    a = get_batch(tokens, 16, 4, micro_batch_seed(1, "train", 5, 0))
    b = get_batch(tokens, 16, 4, micro_batch_seed(1, "train", 5, 0))
    c = get_batch(tokens, 16, 4, micro_batch_seed(1, "train", 5, 1))  # another rank / micro-step
    d = get_batch(tokens, 16, 4, micro_batch_seed(1, "train", 6, 0))  # next step
    assert all((a[i] == b[i]).all() for i in range(2))
    assert not (a[0] == c[0]).all() and not (a[0] == d[0]).all()


def test_targets_are_inputs_shifted_by_one(tiny_data_dir):
    tokens = TokenDataset(tiny_data_dir).splits["train"]
    x, y = get_batch(tokens, 16, 8, [0])
    assert x.shape == y.shape == (8, 16)
    assert (x[:, 1:] == y[:, :-1]).all()
    for row_x, row_y in zip(x, y):  # each row is a real window of the token stream
        hits = [i for i in range(len(tokens) - 17) if (tokens[i:i + 16] == row_x.numpy()).all()]
        assert any((tokens[i + 1:i + 17] == row_y.numpy()).all() for i in hits)


def test_missing_data_names_the_prepare_command(tmp_path):
    with pytest.raises(DataError, match="python -m data.shakespeare_char.prepare"):
        TokenDataset(tmp_path / "shakespeare_char")


def test_truncated_bin_is_detected(tiny_data_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("meta.json", "train.bin"):
        (copy / name).write_bytes((tiny_data_dir / name).read_bytes())
    (copy / "val.bin").write_bytes((tiny_data_dir / "val.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        TokenDataset(copy)


def test_vocab_and_block_size_checks(tiny_data_dir):
    data = TokenDataset(tiny_data_dir)
    data.check_fits(block_size=16, model_vocab_size=data.vocab_size)
    with pytest.raises(DataError, match="vocab_size"):
        data.check_fits(block_size=16, model_vocab_size=data.vocab_size - 1)
    with pytest.raises(DataError, match="block_size"):
        data.check_fits(block_size=len(data.splits["val"]), model_vocab_size=data.vocab_size)

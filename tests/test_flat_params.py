"""FlatParameters: every weight a view into one buffer, through optimizer steps, loading,
wrapping and weight swaps."""

import pytest
import torch

from model import GPT, GPTConfig
from wagpt import checkpoint
from wagpt.flat_params import ALIGN_BYTES, FlatParameters

TINY = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
            bias=True)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY))


def test_parameters_are_aligned_views_of_one_buffer_with_tied_weights_once():
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flat = FlatParameters(model)
    buffer = flat.buffer
    assert buffer.dim() == 1 and buffer.dtype == torch.float32
    params = list(model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight   # tied: one parameter
    assert sum(p.numel() for p in params) <= buffer.numel() < \
        sum(p.numel() for p in params) + len(params) * ALIGN_BYTES // 4
    base = buffer.untyped_storage().data_ptr()
    for name, p in model.named_parameters():
        assert p.untyped_storage().data_ptr() == base, name
        assert (p.data_ptr() - buffer.data_ptr()) % ALIGN_BYTES == 0, name
        assert torch.equal(p, before[name]), name   # values unchanged by flattening
    # the padding between parameters is zero
    covered = torch.zeros(buffer.numel(), dtype=torch.bool)
    for p in params:
        start = (p.data_ptr() - buffer.data_ptr()) // 4
        covered[start:start + p.numel()] = True
    assert covered.sum() == sum(p.numel() for p in params)
    assert torch.all(buffer[~covered] == 0)
    flat.check()


def test_optimizer_step_and_load_state_dict_write_through_to_the_buffer():
    model = tiny_model()
    flat = FlatParameters(model)
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), "cpu")
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]))
    before = flat.buffer.clone()
    model(idx, idx)[1].backward()
    optimizer.step()
    assert not torch.equal(flat.buffer, before)
    assert torch.equal(flat.buffer[:model.transformer.wte.weight.numel()],
                       model.transformer.wte.weight.detach().flatten())
    other = tiny_model(seed=1)
    checkpoint.load_model_state(model, checkpoint.model_state(other), "test")
    flat.check()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name


def test_ddp_wrapping_and_state_dict_keep_the_views(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = tiny_model()
    flat = FlatParameters(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        wrapped = DDP(model)   # broadcasts the weights in place
        flat.check()
        idx = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]))
        wrapped(idx, idx)[1].backward()
        assert model.transformer.wte.weight.grad is not None
    finally:
        dist.destroy_process_group()
    # a snapshot of flattened weights saves (safetensors refuses tensors sharing memory)
    checkpoint.save_snapshot(tmp_path, model, 1, 0, TINY)
    state = checkpoint.read_checkpoint(checkpoint.snapshot_path(tmp_path, 1)).weights
    assert torch.equal(state["transformer.wte.weight"], model.transformer.wte.weight)


def test_moving_the_model_after_flattening_is_detected():
    model = tiny_model()
    flat = FlatParameters(model)
    model.to(torch.float64)
    with pytest.raises(RuntimeError, match="no longer lives in the flat buffer"):
        flat.check()


def test_two_dtypes_make_two_groups_and_buffer_asks_for_one():
    model = tiny_model()
    model.lm_head.weight = torch.nn.Parameter(torch.randn(37, 32, dtype=torch.float64))
    flat = FlatParameters(model)
    assert len(flat.groups) == 2
    with pytest.raises(ValueError, match="online averaging needs one"):
        flat.buffer


def test_swap_restores_the_live_weights_bitwise_even_on_error():
    model = tiny_model()
    flat = FlatParameters(model)
    live = flat.buffer.clone()
    other = torch.randn_like(live)
    with flat.swapped(other):
        assert torch.equal(flat.buffer, other)
        assert torch.equal(model.transformer.wte.weight.flatten(),
                           other[:model.transformer.wte.weight.numel()])
    assert torch.equal(flat.buffer, live)
    with pytest.raises(KeyError):
        with flat.swapped(other):
            raise KeyError("boom")
    assert torch.equal(flat.buffer, live)
    with pytest.raises(ValueError, match="shape"):
        with flat.swapped(other[:-1]):
            pass


def test_torch_compile_trains_the_flat_weights_and_sees_swaps():
    # ~30 s on 2 cores (inductor compiles C++): the one test that runs torch.compile
    model = tiny_model()
    flat = FlatParameters(model)
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), "cpu")
    compiled = torch.compile(model)
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]))
    before = flat.buffer.clone()
    for _ in range(2):
        compiled(idx, idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    flat.check()
    assert not torch.equal(flat.buffer, before)
    with flat.swapped(torch.zeros_like(before)):   # all-zero weights: uniform logits
        assert compiled(idx, idx)[1].item() == pytest.approx(torch.log(torch.tensor(37.)).item())
    torch.testing.assert_close(compiled(idx, idx)[1], model(idx, idx)[1])


def test_flat_from_state_puts_a_state_dict_in_the_buffer_layout():
    model, other = tiny_model(0), tiny_model(1)
    flat = FlatParameters(model)
    live = flat.buffer.clone()
    state = checkpoint.model_state(other)   # the tied head stored once, as in every file
    out = flat.flat_from_state(state, "other")
    assert torch.equal(flat.buffer, live)   # the model is untouched
    with flat.swapped(out):
        for name, p in model.named_parameters():
            assert torch.equal(p, dict(other.named_parameters())[name]), name
    assert out[~torch.isin(torch.arange(out.numel()), torch.cat([
        torch.arange((p.data_ptr() - flat.buffer.data_ptr()) // 4,
                     (p.data_ptr() - flat.buffer.data_ptr()) // 4 + p.numel())
        for p in model.parameters()]))].abs().sum() == 0   # padding zero
    with pytest.raises(ValueError, match="lacks the parameters"):
        flat.flat_from_state({k: v for k, v in state.items() if "wte" not in k}, "cut")
    with pytest.raises(ValueError, match="has shape"):
        flat.flat_from_state({**state, "transformer.wte.weight": torch.zeros(3)}, "bad")

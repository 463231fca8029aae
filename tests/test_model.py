"""model.py on tiny models: shapes, init, tying, causality, optimizer groups, FLOPs, peaks,
sampling."""

import math

import pytest
import torch

import model as model_module
from model import GPT, NAMED_SIZES, GPTConfig, device_peak_flops, peak_flops_for_name

TINY = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def expected_params(n_layer, n_embd, vocab_size, block_size, bias=True):
    """Closed-form GPT-2 parameter count, tied head counted once (independent of model.py)."""
    d = n_embd
    per_layer = 12 * d * d + (13 * d if bias else 2 * d)  # 4 matrices, 9d of biases, 2 LNs
    final_ln = 2 * d if bias else d
    return n_layer * per_layer + vocab_size * d + block_size * d + final_ln


def test_shapes_with_and_without_targets():
    m = tiny_model()
    idx = torch.randint(0, 65, (3, 10))
    logits, loss = m(idx, idx)
    assert logits.shape == (3, 10, 65) and loss.dim() == 0
    logits, loss = m(idx)
    assert logits.shape == (3, 1, 65) and loss is None
    # the inference path's last-position logits are the training path's last column
    torch.testing.assert_close(logits[:, 0], m(idx, idx)[0][:, -1])


def test_loss_at_init_is_log_vocab():
    # std-0.02 init and a tied head give near-uniform predictions; over 50 seeds the gap to
    # ln(65) = 4.17 stayed within [-0.02, 0.04], while a std-1 init is off by several nats
    m = tiny_model()
    idx, targets = torch.randint(0, 65, (8, 16)), torch.randint(0, 65, (8, 16))
    _, loss = m(idx, targets)
    assert abs(loss.item() - math.log(65)) < 0.1


def test_ignore_index_minus_one():
    m = tiny_model()
    idx, targets = torch.randint(0, 65, (2, 8)), torch.randint(0, 65, (2, 8))
    masked = targets.clone()
    masked[:, 4:] = -1
    _, loss_masked = m(idx, masked)
    logits, _ = m(idx, targets)
    manual = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 65),
                                               targets[:, :4].reshape(-1))
    torch.testing.assert_close(loss_masked, manual)


def test_too_long_sequence_is_refused():
    m = tiny_model()
    m(torch.zeros(1, 16, dtype=torch.long))  # exactly block_size is fine
    with pytest.raises(ValueError, match="block_size=16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_causal_future_tokens_do_not_change_past_logits():
    m = tiny_model().eval()
    idx = torch.randint(0, 65, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 65
    before, _ = m(idx, idx)
    after, _ = m(changed, changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])  # the change does reach the future


def test_tied_weights_are_one_tensor_counted_once():
    m = tiny_model()
    assert m.lm_head.weight is m.transformer.wte.weight
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    total = expected_params(2, 32, 65, 16)
    assert m.num_params(non_embedding=False) == total
    assert m.num_params() == total - 16 * 32  # non-embedding drops only the position table


def test_nanogpt_parameter_names():
    names = set(tiny_model(bias=False).state_dict())
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                 "transformer.h.1.ln_1.weight", "transformer.h.1.attn.c_attn.weight",
                 "transformer.h.1.attn.c_proj.weight", "transformer.h.1.ln_2.weight",
                 "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
                 "lm_head.weight"):
        assert name in names
    assert not [n for n in names if n.endswith(".bias")]  # bias=False removes every bias
    assert expected_params(2, 32, 65, 16, bias=False) == tiny_model(bias=False).num_params(False)


@pytest.mark.parametrize("name, nominal, exact", [
    ("gpt2", 124e6, 124_439_808),          # Hugging Face's published counts for vocab 50257
    ("gpt2-medium", 350e6, 354_823_168),
    ("gpt2-large", 774e6, 774_030_080),
    ("gpt2-xl", 1558e6, 1_557_611_200),
])
def test_named_sizes_match_gpt2_param_counts(name, nominal, exact):
    cfg = GPTConfig.named(name, vocab_size=50257)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == tuple(NAMED_SIZES[name].values())
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = GPT(cfg)
    n = m.num_params(non_embedding=False)
    assert n == exact == expected_params(cfg.n_layer, cfg.n_embd, 50257, 1024)
    assert abs(n - nominal) / nominal < 0.02


def test_named_config_overrides_and_unknown_name():
    assert GPTConfig.named("gpt2", block_size=256, dropout=0.1).block_size == 256
    with pytest.raises(ValueError, match="gpt2-medium"):  # the message lists the valid names
        GPTConfig.named("gpt3")


def test_init_stds_and_scaled_residual_projections():
    m = tiny_model(n_layer=8)  # residual std 0.02 / sqrt(16) = 0.005, far from the plain 0.02
    for block in m.transformer.h:
        for proj in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
            assert proj.std().item() == pytest.approx(0.005, rel=0.15)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.15)
        assert block.mlp.c_fc.bias.abs().max() == 0
    assert m.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.15)


def test_optimizer_groups_split_by_dim_and_cover_every_param_once():
    m = tiny_model()
    opt = m.configure_optimizers(weight_decay=0.1, learning_rate=3e-4, betas=(0.9, 0.95),
                                 device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["params"] and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # the tied embedding/head is in there once
    assert set(ids) == {id(p) for p in m.parameters()}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params(False)
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["betas"] == (0.9, 0.95)
    assert not opt.defaults["fused"]  # fused is for CUDA only


def test_optimizer_is_fused_for_cuda():
    # fused AdamW also accepts CPU tensors in recent torch, so the CUDA branch runs here
    m = tiny_model()
    opt = m.configure_optimizers(0.1, 3e-4, (0.9, 0.95), device_type="cuda")
    assert opt.defaults["fused"] is True


def test_flops_per_token_and_mfu():
    m = tiny_model()
    n = expected_params(2, 32, 65, 16) - 16 * 32  # non-embedding N, as nanoGPT
    attention = 12 * 2 * 2 * 16 * 16  # 12 * L * H * Q * T with Q = 32 / 2
    assert m.flops_per_token() == 6 * n + attention
    assert m.estimate_mfu(1000.0, peak_flops=None) is None
    assert m.estimate_mfu(1000.0, peak_flops=1e9) == pytest.approx(
        (6 * n + attention) * 1000.0 / 1e9)


def test_device_peak_flops_override_and_cpu():
    assert device_peak_flops("cpu") is None
    assert device_peak_flops(torch.device("cpu")) is None
    assert device_peak_flops("cpu", override=123e12) == 123e12
    assert device_peak_flops("cuda", override=5e12) == 5e12  # the override wins over the table
    with pytest.raises(ValueError, match="peak_flops"):
        device_peak_flops("cpu", override=0.0)


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", None),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L40S", 362.05e12),
    ("NVIDIA A10G", None),
    ("Tesla T4", None),
])
def test_device_peak_flops_looks_up_cuda_names(monkeypatch, device_name, peak):
    assert peak_flops_for_name(device_name) == peak
    monkeypatch.setattr(model_module.torch.cuda, "get_device_name", lambda device: device_name)
    assert device_peak_flops("cuda:0") == peak


def test_generate_length_determinism_and_context_crop():
    m = tiny_model().eval()
    prompt = torch.randint(0, 65, (2, 20))  # longer than block_size: must be cropped, not refused
    torch.manual_seed(1)
    first = m.generate(prompt, max_new_tokens=6, temperature=0.8, top_k=5)
    torch.manual_seed(1)
    second = m.generate(prompt, max_new_tokens=6, temperature=0.8, top_k=5)
    assert first.shape == (2, 26) and torch.equal(first[:, :20], prompt)
    assert torch.equal(first, second)
    # top_k=1 is greedy, whatever the seed
    greedy = m.generate(prompt, max_new_tokens=6, top_k=1)
    torch.manual_seed(123)
    assert torch.equal(greedy, m.generate(prompt, max_new_tokens=6, temperature=0))


def test_crop_block_size():
    m = tiny_model()
    kept = m.transformer.wpe.weight[:8].detach().clone()
    m.crop_block_size(8)
    assert m.config.block_size == 8 and torch.equal(m.transformer.wpe.weight, kept)
    assert m(torch.zeros(1, 8, dtype=torch.long))[0].shape == (1, 1, 65)
    with pytest.raises(ValueError, match="block_size=8"):
        m(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("overrides, field", [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(block_size=16.0), "block_size"),
    (dict(n_head=True), "n_head"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
])
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}="):
        GPTConfig(**{**TINY, **overrides})

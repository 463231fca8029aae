"""Coupled Adam (coupled_adam.py): against a float64 reference of the paper's formulas, bitwise
AdamW with the coupling off, one denominator for every vocabulary row, exact checkpoints, and
optimizer="coupled_adam" in model.py and train.py."""

import io
import math

import pytest
import torch

import train
from model import GPT, GPTConfig
from wagpt import checkpoint
from wagpt.coupled_adam import CoupledAdamW

V, H = 12, 6                         # an embedding-like matrix: V vocabulary rows of width H
BETAS, EPS = (0.9, 0.95), 1e-8
LRS = [3e-3, 1e-2, 1e-2, 8e-3, 5e-3, 2e-3, 1e-3]  # a changing LR, as a schedule sets it


def make_params(seed=0):
    """E (V x H, coupled), W (a decayed matrix), b (a non-decayed vector), float32."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(0.02 * torch.randn(V, H, generator=g)),
            torch.nn.Parameter(0.02 * torch.randn(H, 4, generator=g)),
            torch.nn.Parameter(torch.randn(4, generator=g))]


def make_grads(n_steps, seed=1):
    """Per step: rows of E on very different scales (frequent vs rare tokens), some rows without
    gradient at a step (tokens absent from the batch), so Adam's per-row v differ by ~1e6."""
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.logspace(-3, 0, V)[:, None]
    steps = []
    for _ in range(n_steps):
        present = (torch.rand(V, 1, generator=g) < 0.7).float()
        steps.append([torch.randn(V, H, generator=g) * row_scale * present,
                      torch.randn(H, 4, generator=g), torch.randn(4, generator=g)])
    return steps


def groups(params, weight_decay=0.1, embedding_weight_decay=0.0, coupled=True, **extra):
    E, W, b = params
    return [{"params": [W], "weight_decay": weight_decay},
            {"params": [b], "weight_decay": 0.0},
            {"params": [E], "weight_decay": embedding_weight_decay, "coupled": coupled, **extra}]


def run(optimizer, params, grads, lrs):
    for step_grads, lr in zip(grads, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def reference(params, grads, lrs, weight_decays, coupled, scale):
    """Float64 Coupled Adam from the paper's formulas: AdamW, except that a coupled matrix's
    bias-corrected second moment v̂ is replaced by c times its mean over the rows (vocabulary)."""
    beta1, beta2 = BETAS
    theta = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(x) for x in theta]
    v = [torch.zeros_like(x) for x in theta]
    for t, (step_grads, lr) in enumerate(zip(grads, lrs), start=1):
        for i, grad in enumerate(step_grads):
            grad = grad.double()
            theta[i] = theta[i] * (1 - lr * weight_decays[i])
            m[i] = beta1 * m[i] + (1 - beta1) * grad
            v[i] = beta2 * v[i] + (1 - beta2) * grad * grad
            m_hat = m[i] / (1 - beta1 ** t)
            v_hat = v[i] / (1 - beta2 ** t)
            if coupled[i]:
                v_hat = (scale * v_hat.mean(dim=0, keepdim=True)).expand_as(v_hat)
            theta[i] = theta[i] - lr * m_hat / (v_hat.sqrt() + EPS)
    return theta


@pytest.mark.parametrize("scale, embedding_weight_decay", [(1.0, 0.0), (0.25, 0.05), (4.0, 0.1)])
def test_matches_a_float64_reference(scale, embedding_weight_decay):
    params, grads = make_params(), make_grads(len(LRS))
    start = [p.detach().double().clone() for p in params]
    opt = CoupledAdamW(groups(params, embedding_weight_decay=embedding_weight_decay), lr=LRS[0],
                       betas=BETAS, eps=EPS, coupled_scale=scale)
    run(opt, params, grads, LRS)
    decays = [embedding_weight_decay, 0.1, 0.0]
    ref = reference(start, grads, LRS, decays, [True, False, False], scale)
    for p, r, p0 in zip(params, ref, start):
        # fp32 rounding only: a few ulps of the weight, a millionth of how far it moved
        moved = (r - p0).abs().max()
        assert moved > 1e-3
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-6, atol=1e-6 * moved)
    # the test can fail: uncoupled Adam moves E very differently
    adam = reference(start, grads, LRS, decays, [False, False, False], scale)
    assert (adam[0] - ref[0]).abs().max() > 0.5 * (ref[0] - start[0]).abs().max()


@pytest.mark.parametrize("extra", [{}, {"foreach": True}, {"fused": True}],
                         ids=["default", "foreach", "fused"])
def test_coupling_off_is_torch_adamw_bitwise(extra):
    a, b = make_params(), make_params()
    grads = make_grads(len(LRS))
    ours = CoupledAdamW(groups(a, embedding_weight_decay=0.05, coupled=False), lr=1.0,
                        betas=BETAS, eps=EPS, **extra)
    adamw = torch.optim.AdamW(groups(b, embedding_weight_decay=0.05)[:2] +
                              [{"params": [b[0]], "weight_decay": 0.05}],
                              lr=1.0, betas=BETAS, eps=EPS, **extra)
    run(ours, a, grads, LRS)
    run(adamw, b, grads, LRS)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    ours_state, adamw_state = ours.state_dict()["state"], adamw.state_dict()["state"]
    assert ours_state.keys() == adamw_state.keys()
    for i in ours_state:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ours_state[i][key], adamw_state[i][key])


def test_the_other_groups_are_torch_adamw_bitwise_when_coupled():
    a, b = make_params(), make_params()
    grads = make_grads(len(LRS))
    run(CoupledAdamW(groups(a), lr=1.0, betas=BETAS, eps=EPS), a, grads, LRS)
    rest = [[g[1], g[2]] for g in grads]
    run(torch.optim.AdamW(groups(b)[:2], lr=1.0, betas=BETAS, eps=EPS), b[1:], rest, LRS)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert not torch.allclose(a[0], b[0])  # E was not touched by AdamW here


@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_every_vocabulary_row_gets_the_same_denominator(scale):
    params, grads = make_params(), make_grads(6)
    opt = CoupledAdamW(groups(params), lr=1e-2, betas=BETAS, eps=EPS, coupled_scale=scale)
    run(opt, params, grads[:5], [1e-2] * 5)
    E = params[0]
    with torch.no_grad():
        E.zero_()  # so the step's update is E itself, without cancellation against the weights
    run(opt, params, grads[5:], [1e-2])
    state = opt.state[E]
    t = float(state["step"])
    m_hat = state["exp_avg"] / (1 - BETAS[0] ** t)
    # update = -lr * m̂ / denom[j]: the ratio is one number per column, the same in every row
    ratio = E.detach() / m_hat
    expected = -1e-2 / ((scale * state["exp_avg_sq"].mean(0) / (1 - BETAS[1] ** t)).sqrt() + EPS)
    torch.testing.assert_close(ratio, expected.expand(V, H), rtol=1e-5, atol=0)
    # while per-element Adam's ratio varies over the rows by orders of magnitude
    adam_denom = (state["exp_avg_sq"] / (1 - BETAS[1] ** t)).sqrt() + EPS
    assert (adam_denom.max(0).values / adam_denom.min(0).values).min() > 100


def test_zero_sum_gradients_keep_the_mean_embedding():
    # the paper's point: an output embedding's gradient sums to zero over the vocabulary, so with
    # one denominator per column the updates do too and the mean embedding stays put; Adam's
    # per-row denominators move it
    grads = make_grads(6)
    for step_grads in grads:
        step_grads[0] -= step_grads[0].mean(dim=0, keepdim=True)
    means = {}
    for coupled in (True, False):
        params = make_params()
        start = params[0].detach().mean(0).clone()
        run(CoupledAdamW(groups(params, coupled=coupled), betas=BETAS), params, grads, LRS)
        means[coupled] = (params[0].detach().mean(0) - start).abs().max()
    assert means[True] < 1e-8 and means[False] > 1e-4


def test_state_dict_round_trip_continues_exactly():
    grads = make_grads(8)
    once = make_params()
    uninterrupted = CoupledAdamW(groups(once, embedding_weight_decay=0.05), betas=BETAS,
                                 coupled_scale=0.5)
    run(uninterrupted, once, grads, LRS + [1e-3])

    first = make_params()
    opt = CoupledAdamW(groups(first, embedding_weight_decay=0.05), betas=BETAS,
                       coupled_scale=0.5)
    run(opt, first, grads[:3], LRS[:3])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as checkpoint.py reads resume checkpoints

    second = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    # a fresh optimizer built with other settings: the saved groups (coupled, scale, decay) win
    resumed = CoupledAdamW(groups(second), betas=BETAS)
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.param_groups[2]["coupled_scale"] == 0.5
    assert resumed.param_groups[2]["weight_decay"] == 0.05
    run(resumed, second, grads[3:], (LRS + [1e-3])[3:])
    for x, y in zip(once, second):
        assert torch.equal(x, y)
    a, b = uninterrupted.state_dict(), resumed.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][key], b["state"][i][key])


def test_loading_adamw_state_names_the_cause():
    params = make_params()
    adamw = torch.optim.AdamW(groups(params)[:2] + [{"params": [params[0]]}])
    with pytest.raises(ValueError, match="saved by another optimizer"):
        CoupledAdamW(groups(params)).load_state_dict(adamw.state_dict())


def test_bad_optimizer_arguments():
    params = make_params()
    with pytest.raises(ValueError, match="coupled_scale=0"):
        CoupledAdamW(groups(params), coupled_scale=0)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        CoupledAdamW([{"params": [params[2]], "coupled": True}])
    with pytest.raises(ValueError, match="amsgrad"):
        CoupledAdamW([{"params": [params[0]], "coupled": True, "amsgrad": True}])


# ---------------------------------------------------------------------------------------------
# model.configure_optimizers and train.py

def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32))


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_configure_optimizers_puts_the_tied_embedding_alone_in_the_coupled_group(device_type):
    # device_type="cuda" only picks fused AdamW, which recent torch also runs on CPU tensors
    m = tiny_gpt()
    opt = m.configure_optimizers(0.1, 3e-4, (0.9, 0.95), device_type, optimizer="coupled_adam",
                                 coupled_adam_scale=2.0, embedding_weight_decay=0.01)
    assert isinstance(opt, CoupledAdamW)
    decay, no_decay, embedding = opt.param_groups
    assert embedding["params"] == [m.transformer.wte.weight]
    assert embedding["params"][0] is m.lm_head.weight  # tied: one tensor, updated once
    assert embedding["coupled"] and not decay["coupled"] and not no_decay["coupled"]
    assert embedding["coupled_scale"] == 2.0 and embedding["weight_decay"] == 0.01
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in m.parameters()}
    assert bool(decay["fused"]) == (device_type == "cuda") and embedding["fused"] is False
    # one step moves every parameter, the weights in place (they are views of a flat buffer)
    before = {id(p): (p.data_ptr(), p.detach().clone()) for p in m.parameters()}
    idx = torch.randint(0, 65, (2, 16))
    m(idx, idx)[1].backward()
    opt.step()
    for p in m.parameters():
        ptr, old = before[id(p)]
        assert p.data_ptr() == ptr and not torch.equal(p, old)


def test_configure_optimizers_adamw_is_unchanged():
    m = tiny_gpt()
    opt = m.configure_optimizers(0.1, 3e-4, (0.9, 0.95), "cpu")
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 2
    with pytest.raises(ValueError, match="optimizer='adam'"):
        m.configure_optimizers(0.1, 3e-4, (0.9, 0.95), "cpu", optimizer="adam")


def test_train_with_coupled_adam_learns_and_resumes_bitwise(make_config, tmp_path):
    common = dict(optimizer="coupled_adam", coupled_adam_scale=0.5, embedding_weight_decay=0.01,
                  averaging="", max_iters=8, ckpt_interval=4, eval_interval=4, log_interval=1)
    summary = train.train(make_config(out_dir=str(tmp_path / "once"), **common))
    assert summary["val_loss"] < math.log(22) - 0.3  # learned well beyond uniform over the vocab
    train.train(make_config(out_dir=str(tmp_path / "twice"), stop_iter=4, **common))
    train.train(make_config(out_dir=str(tmp_path / "twice"), init_from="resume", **common))
    once = checkpoint.read_checkpoint(checkpoint.latest_resume(tmp_path / "once"))
    twice = checkpoint.read_checkpoint(checkpoint.latest_resume(tmp_path / "twice"))
    assert once.step == twice.step == 8
    for key in once.weights:
        assert torch.equal(once.weights[key], twice.weights[key])
    a, b = once.optimizer, twice.optimizer
    assert a["param_groups"] == b["param_groups"]
    # train.py built Coupled Adam from the config keys (the saved groups say so)
    assert [g["coupled"] for g in a["param_groups"]] == [False, False, True]
    assert a["param_groups"][2]["coupled_scale"] == 0.5
    assert a["param_groups"][2]["weight_decay"] == 0.01
    for i in a["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][key], b["state"][i][key])


def test_branching_an_adamw_checkpoint_into_coupled_adam_names_the_cause(make_config, tmp_path):
    common = dict(averaging="", max_iters=2, warmup_iters=1, ckpt_interval=2, eval_interval=2)
    train.train(make_config(out_dir=str(tmp_path / "adamw"), **common))
    with pytest.raises(ValueError, match="saved by another optimizer"):
        train.train(make_config(out_dir=str(tmp_path / "branch"), optimizer="coupled_adam",
                                init_from=str(tmp_path / "adamw" / "ckpt_0000002.pt"), **common))


@pytest.mark.parametrize("overrides, key", [
    (dict(optimizer="adam"), "optimizer='adam'"),
    (dict(optimizer="coupled_adam", coupled_adam_scale=0.0), "coupled_adam_scale=0.0"),
    (dict(coupled_adam_scale=-1.0), "coupled_adam_scale=-1.0"),
    (dict(embedding_weight_decay=-0.1), "embedding_weight_decay=-0.1"),
])
def test_bad_config_values_name_the_key(make_config, overrides, key):
    with pytest.raises(ValueError, match=key):
        make_config(**overrides)

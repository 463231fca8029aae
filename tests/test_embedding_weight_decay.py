"""embedding_weight_decay: the tied token embedding's decoupled weight decay, honoured by AdamW as
by Coupled Adam, so that the Coupled Adam comparison can change the optimizer alone (the paper's
runs decay the embedding in neither). None keeps each optimizer's default."""

import dataclasses
from pathlib import Path

import pytest
import torch

from model import GPT, GPTConfig
from wagpt.configurator import load_config
from wagpt.coupled_adam import CoupledAdamW
from wagpt.dataloader import open_dataset
from wagpt.runtime import init_runtime, teardown
from wagpt.trainer import TrainConfig, build

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models

LR, WD = 1e-2, 0.1


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32))


def step_with_zero_gradients(model, optimizer):
    """One step whose gradients are all zero: Adam's update is 0/(0 + eps) = 0, so a parameter
    moves only by its decoupled weight decay, θ ← (1 − lr·λ)·θ."""
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return before


@pytest.mark.parametrize("optimizer", ["adamw", "coupled_adam"])
@pytest.mark.parametrize("embedding_weight_decay", [0.0, 0.03])
def test_the_embedding_decays_by_embedding_weight_decay(optimizer, embedding_weight_decay):
    m = tiny_gpt()
    opt = m.configure_optimizers(WD, LR, (0.9, 0.95), "cpu", optimizer=optimizer,
                                 embedding_weight_decay=embedding_weight_decay)
    before = step_with_zero_gradients(m, opt)
    E = m.transformer.wte.weight
    torch.testing.assert_close(E, (1 - LR * embedding_weight_decay) * before[id(E)],
                               rtol=0, atol=0)
    W = m.transformer.h[0].attn.c_attn.weight          # every other matrix: weight_decay
    torch.testing.assert_close(W, (1 - LR * WD) * before[id(W)], rtol=0, atol=0)
    g = m.transformer.ln_f.weight                      # norms and biases: never decayed
    assert torch.equal(g, before[id(g)])
    # the embedding (= the tied LM head) sits alone in its group, every parameter once
    assert opt.param_groups[-1]["params"] == [E] and E is m.lm_head.weight
    ids = [id(p) for group in opt.param_groups for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))


def test_none_keeps_each_optimizers_default():
    m = tiny_gpt()
    E = m.transformer.wte.weight
    adamw = m.configure_optimizers(WD, LR, (0.9, 0.95), "cpu")   # as before: decayed like W
    assert type(adamw) is torch.optim.AdamW and len(adamw.param_groups) == 2
    assert any(p is E for p in adamw.param_groups[0]["params"])
    before = step_with_zero_gradients(m, adamw)
    torch.testing.assert_close(E, (1 - LR * WD) * before[id(E)], rtol=0, atol=0)
    coupled = tiny_gpt().configure_optimizers(WD, LR, (0.9, 0.95), "cpu", "coupled_adam")
    assert isinstance(coupled, CoupledAdamW)
    assert coupled.param_groups[-1]["coupled"] and coupled.param_groups[-1]["weight_decay"] == 0


def test_train_py_passes_it_to_adamw(make_config):
    cfg = make_config(optimizer="adamw", embedding_weight_decay=0.0, averaging="")
    runtime = init_runtime(cfg.device, cfg.dtype)
    try:
        run = build(cfg, runtime, open_dataset(cfg.dataset, cfg.data_dir))
        model, optimizer = run.model, run.optimizer
        embedding_group = optimizer.param_groups[-1]
        assert embedding_group["params"] == [model.transformer.wte.weight]
        assert embedding_group["weight_decay"] == 0.0
        assert optimizer.param_groups[0]["weight_decay"] == cfg.weight_decay
    finally:
        teardown(runtime)
    assert TrainConfig().embedding_weight_decay is None


def test_the_coupled_adam_comparison_configs_differ_in_the_optimizer_alone():
    config = Path(__file__).resolve().parent.parent / "config"
    base = load_config(TrainConfig, [str(config / "train_small_adamw_baseline.py")])
    coupled = load_config(TrainConfig, [str(config / "train_small_coupled_adam.py")])
    assert base.embedding_weight_decay == coupled.embedding_weight_decay == 0.0
    assert (base.optimizer, coupled.optimizer) == ("adamw", "coupled_adam")
    differ = {f.name for f in dataclasses.fields(base)
              if getattr(base, f.name) != getattr(coupled, f.name)}
    assert differ == {"optimizer", "out_dir"}

"""
Coupled Adam: AdamW whose token-embedding update divides by the second moment averaged over the
vocabulary (Stollenwerk & Stollenwerk, "Better Embeddings with Coupled Adam", ACL 2025,
arXiv:2502.08441).

Why: the output (LM-head) part of the embedding's gradient sums to zero over the vocabulary: at
each position Σ_i (p_i − y_i) h = 0. Under SGD that part never moves the mean embedding. (Only that
part: in a tied model like this one the input side adds gradients to the rows of the tokens in the
batch, which do not sum to zero, and weight decay shrinks the mean, so even SGD moves the mean of a
tied, decayed embedding.) Adam divides each token's row by its own second moment, rare tokens'
small v give them large steps, the output-side sum no longer vanishes, and the paper argues this
collective shift of all embeddings is what makes them anisotropic. With one denominator per
channel shared by every row, the output-side updates sum to zero again. Every other parameter is
trained by plain AdamW.

The update of a coupled matrix E (V rows = vocabulary, H columns), at step t = 1, 2, ... with
learning rate η_t, decoupled weight decay λ_E, betas β1, β2, eps ε, scale c (coupled_scale):

    E     ← (1 − η_t λ_E) · E                           decoupled weight decay, as AdamW
    m_t   = β1 m_{t−1} + (1 − β1) g_t                   per element, NOT coupled
    v_t   = β2 v_{t−1} + (1 − β2) g_t²                  per element, as Adam keeps it
    m̂_t   = m_t / (1 − β1^t)
    v̄_t[j] = c · (1/V) Σ_i v_t[i, j]                    mean over the vocabulary rows, times c
    E[i,j] ← E[i,j] − η_t m̂_t[i,j] / ( sqrt(v̄_t[j] / (1 − β2^t)) + ε )

i.e. the bias-corrected second moment v̂_t = v_t / (1 − β2^t) of every row is replaced by its
vocabulary mean (scaled by c) before the square root, and ε is added after it, exactly where
AdamW adds it. The paper defines Coupled Adam as this replacement of each embedding vector's
bias-corrected second moment by its average over the vocabulary, with the first moment and the
rest of Adam unchanged. The placement of the scale c (inside the square root, multiplying the
mean) and of ε follows the authors' reference implementation (github.com/flxst/coupled-adam,
nanoGPT/coupled_adam.py, the "COUPLED ADAM" block: sqrt(avg_scale · mean_dim0(v)) / sqrt(1 −
β2^t) + ε); their scaled runs use c = 2^k, k = −5..5, and the default c = 1 is the paper's method.
Since bias correction is one scalar per step, averaging before or after it is the same number.
(The reference couples in its multi-tensor "foreach" path, the one torch picks on CUDA; its
single-tensor path, torch's choice on CPU, raises RuntimeError. Here the coupling holds on every
device.)
The paper's AdamW baseline leaves the embedding undecayed as its Coupled Adam runs do (its
embdecay = False): model.configure_optimizers(embedding_weight_decay=0.0) is that baseline.

State: per parameter exactly AdamW's (step, exp_avg, exp_avg_sq; exp_avg_sq keeps the full V×H
v_t and is averaged only when forming the denominator), so the state_dict has AdamW's layout and
a resumed run continues bit for bit. (The mean of an EMA is the EMA of the means, so an H-vector
would give the same denominators up to rounding at 1/V of the memory; we keep AdamW's layout, as
the authors' code does, for identical checkpoints and a free coupled=False switch.)

    opt = CoupledAdamW([{"params": decay, "weight_decay": 0.1},
                        {"params": no_decay, "weight_decay": 0.0},
                        {"params": [wte.weight], "weight_decay": 0.0, "coupled": True}],
                       lr=6e-4, betas=(0.9, 0.95), coupled_scale=1.0)

A group with coupled=False (the default) is stepped by torch's own AdamW code (the same functional
call torch.optim.AdamW makes, foreach/fused as given), so it is bitwise torch.optim.AdamW; that is
also the switch to turn the coupling off. A coupled group is updated in place with plain tensor ops
(it is one matrix, so foreach buys nothing), on CPU and CUDA; its rows are dim 0 of each of its
tensors. Parameters are updated in place, never rebound, so they stay views into the flat buffer
of flat_params.py. Subclasses torch.optim.AdamW for its hyperparameter checks, defaults and
state_dict; only public torch API is used (the functional `torch.optim.adamw.adamw`).
"""

import math

import torch
from torch.optim.adamw import adamw


class CoupledAdamW(torch.optim.AdamW):
    """torch.optim.AdamW plus per-group `coupled` (bool, default False) and `coupled_scale`
    (c > 0, default 1.0): groups with coupled=True get the vocabulary-coupled second moment."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 coupled_scale=1.0, *, foreach=None, fused=None):
        # the extra keys must be known before AdamW's __init__ adds (and we check) the groups
        self._coupled_defaults = dict(coupled=False, coupled_scale=coupled_scale)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         foreach=foreach, fused=fused)
        self.defaults.update(self._coupled_defaults)

    def add_param_group(self, param_group):
        for key, value in self._coupled_defaults.items():
            param_group.setdefault(key, value)
        if not param_group["coupled_scale"] > 0:
            raise ValueError(f"coupled_scale={param_group['coupled_scale']!r} must be > 0 (it "
                             f"multiplies the vocabulary-mean second moment; 1 = the paper)")
        if param_group["coupled"]:
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            param_group["params"] = params
            for p in params:
                if p.dim() < 2:
                    raise ValueError(f"a coupled group holds matrices whose rows (dim 0) are "
                                     f"the vocabulary; got a tensor of shape {tuple(p.shape)}")
            unsupported = [k for k in ("amsgrad", "maximize", "capturable", "differentiable")
                           if param_group.get(k, self.defaults.get(k))]
            if unsupported:
                raise ValueError(f"a coupled group does not support {', '.join(unsupported)}")
            # the coupled update is its own code: no foreach/fused kernel, and the step counter
            # stays on the CPU (as non-fused AdamW keeps it), so reading it costs no device sync
            param_group["foreach"], param_group["fused"] = False, False
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict):
        # torch would only say "different number of parameter groups"; name the likely cause
        saved = [bool(g.get("coupled", False)) for g in state_dict["param_groups"]]
        ours = [bool(g["coupled"]) for g in self.param_groups]
        if saved != ours:
            raise ValueError(f"the optimizer state has groups with coupled={saved}, this "
                             f"optimizer coupled={ours}: it was saved by another optimizer "
                             f"(e.g. optimizer='adamw'); continue with the one it was saved by, "
                             f"or start from the weights alone (a snapshot), which starts the "
                             f"moments from zero")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError("CoupledAdamW does not support sparse gradients")
            states = [self._state(p, group) for p in params]
            steps = [s["step"] for s in states]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            beta1, beta2 = group["betas"]
            if group["coupled"]:
                if getattr(self, "grad_scale", None) is not None or \
                        getattr(self, "found_inf", None) is not None:
                    raise RuntimeError("CoupledAdamW's coupled group does not take GradScaler "
                                       "state (train in fp32 or bf16, which need no scaler)")
                for p, g, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
                    coupled_adamw_update_(p, g, m, v, step_t, lr=group["lr"], beta1=beta1,
                                          beta2=beta2, eps=group["eps"],
                                          weight_decay=group["weight_decay"],
                                          scale=group["coupled_scale"])
                continue
            # the functional AdamW that torch.optim.AdamW.step calls, with the same arguments
            adamw(params, grads, exp_avgs, exp_avg_sqs,
                  [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], steps,
                  foreach=group["foreach"], capturable=group["capturable"],
                  differentiable=group["differentiable"], fused=group["fused"],
                  grad_scale=getattr(self, "grad_scale", None),
                  found_inf=getattr(self, "found_inf", None),
                  has_complex=any(torch.is_complex(p) for p in params), amsgrad=group["amsgrad"],
                  beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                  eps=group["eps"], maximize=group["maximize"])
        return loss

    def _state(self, p, group):
        """A parameter's state, created on first use exactly as torch.optim.AdamW creates it."""
        state = self.state[p]
        if not state:
            if group["capturable"] or group["fused"]:
                # fused/capturable AdamW keeps the step counter on the device, in float32
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            else:
                # otherwise on the CPU (no device sync to read it), in the default float dtype
                dtype = torch.float64 if torch.get_default_dtype() == torch.float64 \
                    else torch.float32
                state["step"] = torch.tensor(0.0, dtype=dtype)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state


def coupled_adamw_update_(param, grad, exp_avg, exp_avg_sq, step_t, *, lr, beta1, beta2, eps,
                          weight_decay, scale):
    """One Coupled Adam step of one matrix (rows = vocabulary), in place: the formulas of the
    module docstring. Same op order as torch's single-tensor AdamW; only the denominator is a
    (1, H) row shared by all rows instead of a per-element (V, H) tensor."""
    step_t += 1
    step = float(step_t)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    # c · mean over the vocabulary (dim 0), kept as a (1, H, ...) row that broadcasts over V
    coupled_sq = exp_avg_sq.mean(dim=0, keepdim=True).mul_(scale)
    denom = (coupled_sq.sqrt_() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)

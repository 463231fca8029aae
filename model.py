"""
A GPT-2-style decoder in one file, meant to be read top to bottom.

Pre-LayerNorm blocks of causal self-attention and a 4x GELU MLP, learned position embeddings,
and an LM head tied to the token embedding. Parameter names match nanoGPT (transformer.wte,
transformer.h.0.attn.c_attn, lm_head, ...) so nanoGPT checkpoints load by name.

References:
1) nanoGPT, https://github.com/karpathy/nanoGPT/blob/master/model.py (structure, names)
2) GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (init)
3) PaLM: Chowdhery et al. 2022, appendix B (FLOPs per token for MFU)
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from wagpt.coupled_adam import CoupledAdamW

# The released GPT-2 shapes. Only the trunk differs; block_size and vocab_size stay the caller's.
NAMED_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),          # 124M params
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M params
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),   # 774M params
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M params
}


@dataclass
class GPTConfig:
    block_size: int = 1024   # longest context the position embedding covers
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0     # 0 for pretraining; try 0.1+ when finetuning on small data
    bias: bool = True        # biases in Linears and LayerNorms, as GPT-2; False is a bit faster

    def __post_init__(self):
        # fail here, with the key to change, instead of deep inside a matmul shape error
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is not divisible by "
                             f"n_head={self.n_head}; pick n_embd as a multiple of n_head "
                             f"(each head gets n_embd // n_head channels)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout!r} must be in [0, 1); "
                             f"use 0.0 to turn dropout off")

    @classmethod
    def named(cls, name, **overrides):
        """A config with a released GPT-2 shape, e.g. GPTConfig.named("gpt2", vocab_size=50257)."""
        if name not in NAMED_SIZES:
            raise ValueError(f"unknown model size {name!r}; use one of {sorted(NAMED_SIZES)}")
        return cls(**{**NAMED_SIZES[name], **overrides})


# ---------------------------------------------------------------------------------------------
# the transformer block

class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        # one matmul makes q, k and v for all heads at once
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()  # batch, sequence length, channels (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): heads become a batch dimension
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # the fused kernel (flash / memory-efficient) never builds the T x T matrix; is_causal
        # masks the future, and attention dropout must be off in eval, which the kernel can't see
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # exact (erf) GELU as nanoGPT; GPT-2 used the tanh approximation, a negligible difference
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        # pre-LN: normalise the branch input, keep the residual stream itself untouched,
        # so gradients reach early layers through a clean sum of identities
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


# ---------------------------------------------------------------------------------------------
# the model

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embedding
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017): the output layer reuses the input embedding, one
        # tensor under two names; saves vocab_size * n_embd params and helps small models
        self.lm_head.weight = self.transformer.wte.weight

        self.apply(self._init_weights)
        # GPT-2: each residual branch's output projection gets std / sqrt(2 * n_layer), so the
        # residual stream's variance stays ~constant however many branches (2 per layer) add to it
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        # GPT-2 init; LayerNorms keep PyTorch's default (weight 1, bias 0)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameter count, the tied embedding/head counted once.

        non_embedding subtracts the position embedding only, as nanoGPT: the token embedding
        is also the LM head's weight, so its params do compute and stay in the count.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields tied tensors once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) token ids, T <= block_size; targets of -1 are ignored in the loss.

        Returns (logits, loss): with targets, logits for every position (B, T, vocab) and the
        mean cross-entropy; without, logits for the last position only (B, 1, vocab) and None,
        which is all generation needs and skips most of the biggest matmul.
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}; "
                             f"crop the input to the last {self.config.block_size} tokens or "
                             f"build the model with a larger block_size")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is None:
            # a list index keeps the time dimension: (B, 1, vocab)
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context length in place, e.g. to finetune a 1024-context model on 256."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size={block_size} must be in [1, {self.config.block_size}] "
                             f"(cropping only shrinks the context)")
        self.config.block_size = block_size
        wpe = self.transformer.wpe
        wpe.weight = nn.Parameter(wpe.weight[:block_size].detach().clone())
        wpe.num_embeddings = block_size

    # -----------------------------------------------------------------------------------------
    # optimizer

    def optimizer_groups(self, weight_decay):
        """AdamW param groups: decay matrices and embeddings (dim >= 2), not biases or norms.

        Decaying a gain or a bias pulls it towards 0, which changes what the layer computes
        rather than regularising it, hence the split (as GPT-2 / nanoGPT).
        """
        params = [p for p in self.parameters() if p.requires_grad]  # tied weight appears once
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type,
                             optimizer="adamw", coupled_adam_scale=1.0,
                             embedding_weight_decay=None):
        """AdamW over optimizer_groups, or with optimizer="coupled_adam" Coupled Adam
        (coupled_adam.py) for the token embedding (= the tied LM head) with the vocabulary-coupled
        second moment scaled by coupled_adam_scale; every other parameter keeps the AdamW groups.

        embedding_weight_decay: None keeps each optimizer's default, AdamW decaying the embedding
        with weight_decay like every matrix and Coupled Adam not at all (0, as the paper). A
        number moves the embedding into a group of its own with that decay in either optimizer:
        0 for both is the Coupled Adam paper's comparison, which changes only the optimizer."""
        groups = self.optimizer_groups(weight_decay)
        # the fused CUDA kernel updates all params in one launch instead of several per tensor;
        # on CPU the default implementation is fine (and fused is not faster there)
        if device_type == "cuda":
            extra = dict(fused=True) if _adamw_has_fused() else dict(foreach=True)
        else:
            extra = {}
        if optimizer not in ("adamw", "coupled_adam"):
            raise ValueError(f"optimizer={optimizer!r} is unknown; use 'adamw' or 'coupled_adam'")
        coupled = optimizer == "coupled_adam"
        if embedding_weight_decay is None and coupled:
            embedding_weight_decay = 0.0
        embedding = self.transformer.wte.weight
        if embedding_weight_decay is not None:
            groups[0]["params"] = [p for p in groups[0]["params"] if p is not embedding]
            if embedding.requires_grad:
                groups.append({"params": [embedding], "weight_decay": embedding_weight_decay,
                               **({"coupled": True} if coupled else {})})
        if not coupled:
            return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), **extra)
        return CoupledAdamW(groups, lr=learning_rate, betas=tuple(betas),
                            coupled_scale=coupled_adam_scale, **extra)

    # -----------------------------------------------------------------------------------------
    # throughput accounting

    def flops_per_token(self):
        """Training FLOPs (forward + backward) per token, PaLM appendix B.

        6N for the weight matmuls (2 forward, 4 backward, per param) plus 12 * L * H * Q * T for
        attention scores and their weighted sum, which depend on context length, not params.
        N = num_params() (non-embedding), the same N nanoGPT uses. Counts every token as seeing
        a full block_size context, so it slightly overstates causal attention's true cost.
        """
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.num_params() + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s over the device peak; None without a peak."""
        if peak_flops is None:
            return None
        return self.flops_per_token() * tokens_per_second / peak_flops

    # -----------------------------------------------------------------------------------------
    # sampling

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Append max_new_tokens sampled tokens to idx (B, T) and return it (B, T + new).

        Call model.eval() first so dropout is off. temperature=0 picks the argmax (greedy);
        top_k keeps only the k most likely tokens before sampling. No KV cache: every step
        reruns the whole (cropped) context, which is simple and fast enough for samples.
        """
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
        for _ in range(max_new_tokens):
            # the position embedding only covers block_size, so keep the most recent tokens
            context = idx[:, -self.config.block_size:]
            logits, _ = self(context)
            logits = logits[:, -1, :]
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


def _adamw_has_fused():
    return "fused" in inspect.signature(torch.optim.AdamW).parameters


# ---------------------------------------------------------------------------------------------
# device peaks for MFU

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s. Matched
# against torch.cuda.get_device_name(); every word of a key must be a word of the name (whole
# words, so "A10" could never match "A100"), and the first match wins, so a more specific key
# comes before its prefix ("H100 PCIe" before "H100"). A None entry blocks a wrong match; unlisted
# GPUs, CPU and MPS also give None, and --peak_flops sets the figure by hand.
PEAK_BF16_FLOPS = {
    "H200 NVL": None,     # lower clocks than SXM, like H100 NVL below
    "H200": 989e12,       # H200 SXM: same compute as H100 SXM, more and faster memory
    "H100 PCIe": 756e12,
    "H100 NVL": None,     # lower clocks than SXM, so it must not fall through to "H100"
    "H100": 989e12,       # H100 SXM ("NVIDIA H100 80GB HBM3")
    "A100": 312e12,       # SXM and PCIe share the figure
    "L40S": 362.05e12,
}


def peak_flops_for_name(device_name):
    """Dense bf16 peak for a CUDA device name from PEAK_BF16_FLOPS, or None if unlisted."""
    words = set(device_name.lower().replace("-", " ").split())  # "A100-SXM4-80GB" -> 3 words
    for key, flops in PEAK_BF16_FLOPS.items():
        if set(key.lower().split()) <= words:
            return flops
    return None


def device_peak_flops(device, override=None):
    """Peak FLOP/s to measure MFU against: the override if given, else the table for CUDA.

    These are dense bf16 tensor-core peaks, the usual MFU denominator for mixed-precision
    training; a run in fp32 or fp16 against them is not comparable.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak_flops={override} must be positive (FLOP/s, e.g. 989e12)")
        return float(override)
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))

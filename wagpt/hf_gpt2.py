"""
The one mapping between model.py's GPT and Hugging Face transformers' GPT2LMHeadModel, both ways:
export_hf.py writes our checkpoints as transformers folders with it, and `--init_from=gpt2` (or a
transformers GPT-2 folder) starts training from one.

    to_hf_model(model)        our GPT -> GPT2LMHeadModel computing the same function
    from_hf_model(hf)         GPT2LMHeadModel -> (state_dict, model_args) for GPT(GPTConfig(...))
    load_pretrained(source)   'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' (the hub) or a
                              local transformers GPT-2 folder -> (state_dict, model_args)
    is_pretrained_source(s)   whether s names one of those, not a file of ours

checkpoint.read_checkpoint, the one reader, takes these sources too (a record of kind
'pretrained', step 0): so do train.py's --init_from and every tool's --ckpt.

model.py is GPT-2's architecture and uses its parameter names, so the mapping is the identity on
names with three differences:
- Conv1D: HF's GPT-2 stores c_attn, c_proj and c_fc weights as (in, out), nn.Linear as (out, in),
  so those weights are transposed (_CONV1D_WEIGHT).
- Biases: HF's GPT-2 always has them. A bias=False model exports zero biases (Linear and
  LayerNorm), which compute the same function; importing a folder whose biases are all exactly
  zero gives bias=False again, so export -> import -> export is the identity, bit for bit.
- GELU: model.py computes the exact erf GELU (nn.GELU(), as nanoGPT). Exports say
  activation_function='gelu', so HF computes our function exactly. The released GPT-2 checkpoints
  use the tanh approximation 'gelu_new'; they are imported as nanoGPT's from_pretrained imports
  them, into the exact GELU. That moves each activation by at most 4.7e-4 (at |x| = 2.7); on
  random weights of GPT-2 124M's shape the logits move by up to 9e-4 (exactly 0 with 'gelu').
  load_pretrained prints a note when it happens.
LayerNorm eps is 1e-5 in both; attention is scaled by 1/sqrt(head size) in both; the LM head is
tied to the token embedding in both. Anything else (another n_inner, activation, eps, scaling,
an untied head) is refused with the config key that differs.
"""

import json
import os
import re
from pathlib import Path

import torch

from model import GPT, GPTConfig
from wagpt.errors import CheckpointError

# the released GPT-2 checkpoints on the Hugging Face hub (the owner-less ids are redirects)
PRETRAINED = {name: f"openai-community/{name}"
              for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}

# model.py's nn.Linear weights that HF's GPT-2 stores transposed, as Conv1D
_CONV1D_WEIGHT = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")
# biases that a bias=False model lacks
_OPTIONAL_BIAS = re.compile(r"\.(c_attn|c_proj|c_fc|ln_1|ln_2|ln_f)\.bias$")
# older transformers keep the causal mask as buffers h.N.attn.bias / h.N.attn.masked_bias
_MASK_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")

EXACT_GELU = ("gelu", "gelu_python")                            # erf: nn.GELU() exactly
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast")   # GPT-2's
GELU_TANH_NOTE = (
    "it uses the tanh GELU approximation ('gelu_new'); model.py computes the exact erf GELU, as "
    "nanoGPT does when it loads GPT-2: each activation moves by at most 4.7e-4 (the logits of "
    "random weights of GPT-2 124M's shape by up to 9e-4)")


class PretrainedLoadError(CheckpointError):
    """A pretrained source that cannot be loaded or mapped; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# ours -> transformers

def hf_config(model_args, eos_token_id=None):
    """The GPT2Config of a model with our `model_args`."""
    from transformers import GPT2Config
    return GPT2Config(
        vocab_size=model_args["vocab_size"], n_positions=model_args["block_size"],
        n_embd=model_args["n_embd"], n_layer=model_args["n_layer"],
        n_head=model_args["n_head"], n_inner=None,             # None = 4 * n_embd, as model.py
        activation_function="gelu",                            # exact erf GELU = nn.GELU()
        layer_norm_epsilon=1e-5,                               # nn.LayerNorm's default
        resid_pdrop=model_args.get("dropout", 0.0), embd_pdrop=model_args.get("dropout", 0.0),
        attn_pdrop=model_args.get("dropout", 0.0),
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False, tie_word_embeddings=True,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        architectures=["GPT2LMHeadModel"])


def to_hf_model(model, eos_token_id=None):
    """A GPT2LMHeadModel computing the same function as our GPT `model` (float32, eval mode)."""
    from transformers import GPT2LMHeadModel
    args = model.config
    hf = GPT2LMHeadModel(hf_config(vars(args), eos_token_id)).eval()
    ours = _state_without_tied_head(model)
    mapped, used = {}, set()
    for key, reference in hf.state_dict().items():
        if key == "lm_head.weight":
            continue                              # tied to transformer.wte.weight in both
        if key in ours:
            tensor = ours[key].detach().cpu().float()
            mapped[key] = tensor.t().contiguous() if _CONV1D_WEIGHT.search(key) else tensor
            used.add(key)
        elif _OPTIONAL_BIAS.search(key) and not args.bias:
            mapped[key] = torch.zeros_like(reference)
        elif _MASK_BUFFER.search(key):
            mapped[key] = reference               # older transformers' causal-mask buffers
        else:
            raise KeyError(f"the HF model's {key} has no counterpart in our model")
        if mapped[key].shape != reference.shape:
            raise ValueError(f"{key}: our shape {tuple(mapped[key].shape)} vs HF's "
                             f"{tuple(reference.shape)}")
    if set(ours) - used:
        raise KeyError(f"our weights {sorted(set(ours) - used)[:5]} have no place in HF's GPT-2")
    hf.load_state_dict(mapped, strict=False)    # lm_head.weight is wte's tensor already
    return hf


def _state_without_tied_head(model):
    # not checkpoint.model_state: it finds tied tensors by address, and on the meta device
    # (from_hf_model's shape template) every tensor has address 0
    state = dict(model.state_dict())              # a bare GPT (not wrapped by DDP or compile)
    state.pop("lm_head.weight")                   # = transformer.wte.weight (tied)
    return state


@torch.no_grad()
def max_logit_difference(model, hf, tokens=16, seed=0):
    """max |logits ours - logits HF| on two random sequences (both in float32 on CPU)."""
    generator = torch.Generator().manual_seed(seed)
    T = min(tokens, model.config.block_size)
    idx = torch.randint(0, model.config.vocab_size, (2, T), generator=generator)
    ours, _ = model.cpu().eval()(idx, targets=idx)          # targets: logits at every position
    theirs = hf.cpu().eval()(idx).logits
    return (ours - theirs).abs().max().item()


# ---------------------------------------------------------------------------------------------
# transformers -> ours

def from_hf_model(hf, source="the transformers model"):
    """(state_dict, model_args) of our GPT computing hf's function (float32 tensors).

    The state has no lm_head.weight (tied: checkpoint.load_model_state accepts that). Raises
    PretrainedLoadError, naming `source` and the config key, for what model.py cannot represent.
    """
    c = hf.config
    if getattr(c, "model_type", None) != "gpt2":
        raise PretrainedLoadError(f"{source} is a {getattr(c, 'model_type', None)!r} model, not "
                                  f"GPT-2; only GPT-2 maps onto model.py")
    n_embd = c.n_embd
    refusals = [
        (c.n_inner not in (None, 4 * n_embd),
         f"n_inner={c.n_inner} (model.py's MLP is 4 * n_embd = {4 * n_embd} wide)"),
        (c.activation_function not in EXACT_GELU + TANH_GELU,
         f"activation_function={c.activation_function!r} (model.py computes GELU)"),
        (c.layer_norm_epsilon != 1e-5,
         f"layer_norm_epsilon={c.layer_norm_epsilon} (model.py's LayerNorm uses 1e-5)"),
        (not c.scale_attn_weights, "scale_attn_weights=False (model.py scales by 1/sqrt(d))"),
        (c.scale_attn_by_inverse_layer_idx, "scale_attn_by_inverse_layer_idx=True"),
        (getattr(c, "add_cross_attention", False), "add_cross_attention=True"),
    ]
    for refused, what in refusals:
        if refused:
            raise PretrainedLoadError(f"{source} has {what}, which model.py cannot represent; "
                                      f"use a GPT-2 model without it")
    hf_state = hf.state_dict()
    head, wte = hf_state.get("lm_head.weight"), hf_state["transformer.wte.weight"]
    if head is not None and not torch.equal(head, wte):
        raise PretrainedLoadError(f"{source} has an LM head that is not tied to the token "
                                  f"embedding (tie_word_embeddings=False); model.py ties them")
    # bias=False is the inverse of export_hf: every optional bias exactly zero
    bias = any(t.any() for k, t in hf_state.items() if _OPTIONAL_BIAS.search(k))
    model_args = dict(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                      n_head=c.n_head, n_embd=n_embd, dropout=float(c.resid_pdrop), bias=bias)
    try:
        with torch.device("meta"):                 # names and shapes only, no memory
            expected = _state_without_tied_head(GPT(GPTConfig(**model_args)))
    except ValueError as e:
        raise PretrainedLoadError(f"{source}: {e}") from e
    state = {}
    for key, reference in expected.items():
        if key not in hf_state:
            raise PretrainedLoadError(f"{source} lacks {key}; it is not a GPT2LMHeadModel")
        tensor = hf_state[key].detach().to(torch.float32)
        state[key] = tensor.t().contiguous() if _CONV1D_WEIGHT.search(key) else tensor
        if state[key].shape != reference.shape:
            raise PretrainedLoadError(f"{source}: {key} has shape {tuple(hf_state[key].shape)}, "
                                      f"expected {tuple(reference.shape)} for its config")
    left = [k for k in hf_state if k not in state and k != "lm_head.weight"
            and not _MASK_BUFFER.search(k) and not (not bias and _OPTIONAL_BIAS.search(k))]
    if left:
        raise PretrainedLoadError(f"{source} has weights model.py has no place for: {left[:5]}")
    return state, model_args


def is_pretrained_source(source):
    """True for 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' and for a directory (a
    transformers folder): what load_pretrained takes. Our own checkpoints are files; train.py's
    'scratch' and 'resume' are neither."""
    if source in ("", "scratch", "resume"):     # never a folder, even if one has the name
        return False
    return source in PRETRAINED or Path(source).is_dir()


def load_pretrained(source):
    """(state_dict, model_args) of a released GPT-2 (name in PRETRAINED, from the hub or the
    local HF cache) or of a transformers GPT-2 folder (e.g. one export_hf.py wrote).

    Offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set) only the local cache is tried. Every
    failure is a PretrainedLoadError whose one-line message names the source and the fix."""
    from transformers import GPT2LMHeadModel

    if source in PRETRAINED:
        hub_id = PRETRAINED[source]
        offline = _offline()
        try:
            hf = GPT2LMHeadModel.from_pretrained(hub_id, local_files_only=offline)
        except Exception as e:   # OSError, HTTP and connection errors of several libraries
            where = ("the local Hugging Face cache (offline mode is set)" if offline
                     else "the Hugging Face hub")
            raise PretrainedLoadError(
                f"{source}: could not load {hub_id} from {where} ({_reason(e)}); "
                f"where the hub is reachable run `hf download {hub_id} config.json "
                f"model.safetensors --local-dir {source}`, "
                f"copy that folder here and give ./{source} instead") from e
        name = f"{source} ({hub_id})"
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise PretrainedLoadError(
                f"{source}: not a folder; give one of {', '.join(PRETRAINED)} or a "
                f"transformers GPT-2 folder (config.json + model.safetensors)")
        config = folder / "config.json"
        if not config.is_file():
            raise PretrainedLoadError(
                f"{source}: {config} is missing, so this is no transformers model "
                f"folder; pass one (export_hf.py writes them) or a checkpoint file of ours")
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != "gpt2":
            raise PretrainedLoadError(f"{source}: {config} says model_type="
                                      f"{model_type!r}; only GPT-2 ('gpt2') maps onto model.py")
        try:
            hf = GPT2LMHeadModel.from_pretrained(folder, local_files_only=True)
        except Exception as e:
            raise PretrainedLoadError(f"{source}: transformers cannot load the "
                                      f"folder ({_reason(e)}); check its weight files") from e
        name = str(folder)
    state, model_args = from_hf_model(hf, name)
    if hf.config.activation_function in TANH_GELU:
        print(f"note: {name}: {GELU_TANH_NOTE}")
    return state, model_args


def _offline():
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _reason(e):
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}{'...' if len(first) > 160 else ''}"

# GPT-2 small (124M) on OpenWebText with Coupled Adam (Stollenwerk & Stollenwerk, ACL 2025,
# arXiv:2502.08441): train_small.py's AdamW + cosine run, except that the tied token embedding's
# Adam denominator uses its second moment averaged over the vocabulary (coupled_adam.py). Compare
# its val loss (and embedding isotropy) with out/small, the plain-AdamW baseline. As in the paper:
# scale 1 (its scaled variants use powers of 2) and no weight decay on the embedding.
# Launch:
#   torchrun --standalone --nproc_per_node=8 train.py config/train_small_coupled_adam.py
from pathlib import Path as _Path

exec((_Path(__file__).parent / "train_small.py").read_text())

out_dir = "out/small_coupled_adam"
optimizer = "coupled_adam"
coupled_adam_scale = 1.0
embedding_weight_decay = 0.0

"""
Geometry of a token embedding matrix E (V x H, one row e_i per token), the quantities the
Coupled Adam paper tracks (Stollenwerk & Stollenwerk 2025, "Better Embeddings with Coupled
Adam"): Adam's per-coordinate second moments let rare tokens' embeddings drift together along a
common direction, so the matrix becomes anisotropic and its mean embedding large.

    isotropy                I(E) = min_c Z(c) / max_c Z(c),  Z(c) = sum_i exp(c^T e_i), c over
                            the unit eigenvectors of E^T E, both signs (Mu et al. 2018, "All-but-
                            the-Top", eq. 7-8). 1 = no preferred direction, -> 0 = a common one.
    mean_norm               (1/V) sum_i ||e_i||
    norm_of_mean            ||(1/V) sum_i e_i||
    norm_ratio              norm_of_mean / mean_norm, in [0, 1]: 0 = centred, 1 = all rows equal
    singular_value_ratio    sigma_min(E) / sigma_max(E) (inverse condition number)
    norm_logfreq_pearson    Pearson r of ||e_i|| with log(count_i), count_i = occurrences of
                            token i in the training data, over the tokens that occur

Every function takes a tensor or array and computes in float64 (exp(c^T e_i) of a trained
embedding overflows float32). Rows past `vocab_size` (the padding of 50257 -> 50304 for speed)
are no token the tokenizer can emit and are left out of every metric above.

The Coupled Adam authors' analysis code (github.com/flxst/coupled-adam, nanoGPT/analysis) reports
two of these under other conventions; their figures are comparable only with these two:

    isotropy_solver_sign_all_rows   I(E) with one direction per eigenvector, the sign numpy's
                                    eigensolver (np.linalg.eig of E^T E) happens to return, over
                                    every row of E, padding included. >= isotropy over the same
                                    rows (min over 2H directions vs over H of them).
    norm_logprob_pearson_all_rows   Pearson r of ||e_i|| with log(p_i + 1e-10), p_i = count_i /
                                    sum(count), over every row of E: tokens that never occur and
                                    padding rows enter at log(1e-10).

Ours leave those rows out and take both signs because a metric of the vocabulary should neither
depend on padding nor on an arbitrary sign; the reference's are kept so figures can be compared.
"""

import math

import numpy as np
import torch


def _float64(E):
    if isinstance(E, torch.Tensor):
        return E.detach().cpu().to(torch.float64)
    return torch.from_numpy(np.ascontiguousarray(E, dtype=np.float64))   # any array, any strides


def isotropy(E):
    """I(E) of Mu et al. (2018), in (0, 1].

    Z(c) is summed in log space (logsumexp): exp(c^T e_i) overflows even float64 once
    ||e_i|| > ~700. Both c and -c are used: an eigenvector's sign is an arbitrary choice of the
    eigensolver, and Z(c) != Z(-c) exactly when the embeddings share a direction, which is what
    the metric is meant to catch. (Code that takes the solver's sign gives a value >= this one.)
    """
    E = _float64(E)
    _, eigenvectors = torch.linalg.eigh(E.T @ E)        # columns: unit eigenvectors of E^T E
    directions = torch.cat([eigenvectors, -eigenvectors], dim=1)
    log_z = torch.logsumexp(E @ directions, dim=0)      # log Z(c) for every direction c
    return math.exp((log_z.min() - log_z.max()).item())


def isotropy_solver_sign(E):
    """I(E) as the Coupled Adam authors' analysis code computes it: c over the unit eigenvectors of
    E^T E from np.linalg.eig, each with the sign the solver returns (one direction per
    eigenvector, not both). Their code sums exp() directly in the embedding's dtype and rounds to 4
    decimals; this sums in log space in float64 (the same value wherever theirs does not overflow)
    and does not round. The solver's signs are arbitrary, so the value is too: it is kept only to
    compare with figures computed that way."""
    E = _float64(E).numpy()
    _, eigenvectors = np.linalg.eig(E.T @ E)   # the general solver, as the reference
    directions = torch.from_numpy(np.ascontiguousarray(np.real(eigenvectors)))   # E^T E is
    log_z = torch.logsumexp(torch.from_numpy(E) @ directions, dim=0)            # symmetric: real
    return math.exp((log_z.min() - log_z.max()).item())


def norm_stats(E):
    """mean_norm, norm_of_mean and norm_ratio = norm_of_mean / mean_norm."""
    E = _float64(E)
    mean_norm = E.norm(dim=1).mean().item()
    norm_of_mean = E.mean(dim=0).norm().item()
    return {"mean_norm": mean_norm, "norm_of_mean": norm_of_mean,
            "norm_ratio": norm_of_mean / mean_norm if mean_norm > 0 else float("nan")}


def singular_value_ratio(E):
    """sigma_min / sigma_max of E (from the SVD itself: sqrt of E^T E's eigenvalues would square
    the condition number and lose the small singular values to rounding)."""
    s = torch.linalg.svdvals(_float64(E))
    return (s.min() / s.max()).item() if s.max() > 0 else float("nan")


def count_tokens(tokens, vocab_size, chunk=1 << 26):
    """Occurrences of every id 0..vocab_size-1 in a token array (e.g. the train.bin memmap).

    Counted in chunks: np.bincount copies its input to int64, 8x a uint16 memmap's size, which
    for OpenWebText's 9B tokens would not fit in memory at once."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        part = np.bincount(np.asarray(tokens[start:start + chunk]), minlength=vocab_size)
        if len(part) > vocab_size:
            raise ValueError(f"the tokens hold id {len(part) - 1}, outside a vocabulary of "
                             f"{vocab_size}")
        counts += part
    return counts


def norm_frequency_correlation(E, counts):
    """(Pearson r of ||e_i|| with log count_i over the tokens with count_i > 0, tokens used,
    tokens left out because they never occur). r is None with fewer than 2 tokens or no spread
    (e.g. every token equally frequent).

    Tokens that never occur have log count = -inf and are left out rather than given a made-up
    count; their number is returned so a report can say how many."""
    norms = _float64(E).norm(dim=1).numpy()
    counts = np.asarray(counts)
    if len(counts) != len(norms):
        raise ValueError(f"{len(counts)} token counts for {len(norms)} embedding rows")
    seen = counts > 0
    x, y = norms[seen], np.log(counts[seen].astype(np.float64))
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        r = None
    else:
        r = float(np.corrcoef(x, y)[0, 1])
    return r, int(seen.sum()), int((~seen).sum())


def norm_logprob_correlation_all_rows(E, counts):
    """Pearson r of ||e_i|| with log(p_i + 1e-10), p_i = count_i / sum(count), over every row of E
    (the Coupled Adam authors' analysis code): rows without a count (padding past len(counts))
    and tokens that never occur enter with p = 0. None if either side has no spread."""
    norms = _float64(E).norm(dim=1).numpy()
    counts = np.asarray(counts, dtype=np.float64)[:len(norms)]
    probability = np.zeros(len(norms))
    probability[:len(counts)] = counts / counts.sum()
    y = np.log(probability + 1e-10)
    if norms.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(norms, y)[0, 1])


def embedding_metrics(E, token_counts=None, vocab_size=None):
    """Every metric above for the first `vocab_size` rows of E (all rows if None) as a dict,
    plus the reference's conventions (*_all_rows) over every row of E; the frequency
    correlations only with `token_counts` (one count per id, length >= vocab_size or exactly the
    rows used)."""
    rows = E.shape[0]
    vocab_size = rows if vocab_size is None else vocab_size
    if not 0 < vocab_size <= rows:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {rows}] (rows of E)")
    all_rows = _float64(E)
    E = all_rows[:vocab_size]
    result = {"rows": vocab_size, "padding_rows_excluded": rows - vocab_size,
              "isotropy": isotropy(E), **norm_stats(E),
              "singular_value_ratio": singular_value_ratio(E),
              "isotropy_solver_sign_all_rows": isotropy_solver_sign(all_rows)}
    if token_counts is not None:
        counts = np.asarray(token_counts)[:vocab_size]
        r, used, unseen = norm_frequency_correlation(E, counts)
        result.update(norm_logfreq_pearson=r, norm_logfreq_tokens=used,
                      unseen_tokens_excluded=unseen,
                      norm_logprob_pearson_all_rows=norm_logprob_correlation_all_rows(all_rows,
                                                                                      counts))
    return result

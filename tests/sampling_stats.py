"""Is a sample drawn from a given categorical distribution? Pearson's chi-square test.

The threshold is the chi-square quantile at 1 - 1e-6 for the sample's degrees of freedom: a
correct sampler exceeds it once in a million seeds, while a wrong filter, a dropped temperature
or a shifted nucleus moves the statistic by orders of magnitude at these sample sizes. A token
of probability 0 must never be drawn at all.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import chi2

FALSE_ALARM = 1e-6


def assert_sampled_from(samples, probs) -> None:
    probs = np.asarray(probs, dtype=np.float64)
    counts = np.bincount(np.asarray(samples).reshape(-1), minlength=len(probs)).astype(np.float64)
    n = counts.sum()
    impossible = probs == 0
    assert counts[impossible].sum() == 0, f"drew tokens of probability 0: {np.nonzero(counts * impossible)[0]}"
    expected = n * probs[~impossible]
    stat = float((((counts[~impossible] - expected) ** 2) / expected).sum())
    df = int((~impossible).sum()) - 1
    limit = float(chi2.ppf(1 - FALSE_ALARM, df)) if df > 0 else 0.0
    assert stat <= limit, (f"chi-square {stat:.1f} > {limit:.1f} (df {df}, n {int(n)}): counts "
                           f"{counts.tolist()} vs expected {(n * probs).round(1).tolist()}")


def filtered_probs(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The distribution the definitions give (written out here, not the package's code): divide
    by the temperature, keep the k most likely, then the smallest most-likely-first prefix whose
    probability reaches top_p, and renormalise."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    order = list(np.argsort(-z, kind="stable"))
    if top_k:
        order = order[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    keep, mass = [], 0.0
    for idx, q in zip(order, p):
        keep.append(idx)
        mass += q
        if mass >= top_p:
            break
    out = np.zeros(len(z))
    w = np.exp(z[keep] - z[keep].max())
    out[keep] = w / w.sum()
    return out

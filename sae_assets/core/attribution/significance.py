"""Is the attributed unit's effect bigger than a random unit's? A one-sided paired test.

Each ablated unit is paired with a random control unit of the same layer over the same
windows (ablation.py), giving pairs (attributed, control) of notable-token flip proportions.
`paired_sign_flip_test` tests H0 "attribution is no better than chance" (the differences are
symmetric about 0) against H1 "attributed units flip more": the statistic is the sum of the
differences and its null distribution flips each difference's sign, exactly (all 2^n sign
vectors) up to `exact_max` pairs, else by a seeded Monte Carlo draw, whose p-value
(hits + 1) / (draws + 1) never reads 0. Pure numpy; tests: tests/test_attribution_core.py.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class PairedTest(NamedTuple):
    pairs: int
    """n: pairs with both proportions defined."""
    mean_difference: float | None
    """Mean of attributed - control (None when n = 0)."""
    p_value: float | None
    """One-sided p-value of H1 'attributed > control' (None when n = 0)."""
    method: str
    """'exact sign-flip' or 'monte-carlo sign-flip (R draws)'."""


def paired_sign_flip_test(attributed, control, *, seed: int = 0, exact_max: int = 16,
                          draws: int = 200_000) -> PairedTest:
    """One-sided paired permutation test of mean(attributed - control) > 0; None entries are dropped."""
    pairs = [(a, b) for a, b in zip(attributed, control) if a is not None and b is not None]
    if not pairs:
        return PairedTest(0, None, None, "no pairs")
    d_N = np.array([a - b for a, b in pairs], dtype=np.float64)
    n, observed = len(d_N), float(d_N.sum())
    # A tolerance, so that sums equal to the observed one up to rounding count as "as extreme".
    tie = 1e-12 * max(1.0, float(np.abs(d_N).sum()))
    if n <= exact_max:
        signs_SN = 1 - 2 * ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1)  # (2^n, n) every sign vector
        p = float(np.mean(signs_SN @ d_N >= observed - tie))
        method = "exact sign-flip"
    else:
        rng = np.random.default_rng(seed)
        hits = 0
        for start in range(0, draws, 8192):  # chunks keep memory at 8192 x n
            signs_SN = rng.choice(np.array([-1.0, 1.0]), size=(min(8192, draws - start), n))
            hits += int(np.count_nonzero(signs_SN @ d_N >= observed - tie))
        p = (hits + 1) / (draws + 1)
        method = f"monte-carlo sign-flip ({draws} draws)"
    return PairedTest(n, float(d_N.mean()), p, method)

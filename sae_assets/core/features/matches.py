"""Cross-dictionary feature matching: for every feature of dictionary A, the closest feature of dictionary B.

`closest_features(W_dec_AD, W_dec_BD)` gives, for each decoder row of A, the row of B with the
highest cosine similarity and that cosine ("the closest feature in each other dictionary");
with `same=True` B is A and a feature is never its own match ("the closest other feature").
It is exact, not approximate nearest neighbours: every row of A meets every row of B, so one
ordered pair of dictionaries costs F_A x F_B x D multiply-adds (F^2 x D within one dictionary),
run blockwise in float32 so that memory is O(block^2 + block x D) and never F_A x F_B. The
result is 12 bytes a feature of A in memory (int64 id, float32 cosine); `matches_table` makes
it 20 (feature, match, cosine), and `write_matches` stores that as zstd Parquet in about 5
bytes a feature of A (ids 0..F_A-1 delta-coded to nearly nothing, the match's log2 F_B bits,
the cosine's ~3 bytes; 4.9 measured for random directions at F_A = F_B = 8192).
tests/test_matches.py checks it against the full cosine matrix in float64;
bench/feature_matches.py times it against one plain matmul of the same multiply-adds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from sae_assets.core import schemas

# Letter key: A features of the dictionary matched, B features of the dictionary searched,
# D model width; lower-case a, b: one block of A's or B's rows.

MATCHES_SCHEMA = schemas.feature_matches_schema()
"""A row per feature of A, in feature order: its closest feature of B and their decoder cosine."""


def closest_features(W_dec_AD: torch.Tensor, W_dec_BD: torch.Tensor, *, same: bool = False, block: int = 4096,
                     device: str = "cpu",
                     progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids (A,) int64, cosines (A,) float32): for each decoder row of A, the row of B with the
    highest cosine similarity, and that cosine.

    Exact over unit rows in float32: the ids are the true argmax except where two of B's rows
    are within float32 rounding (~1e-6) of each other. Ties go to the lowest b, so the result
    is deterministic (torch's max returns the first maximum within a block; a later block
    replaces the best only when strictly higher). A zero row has cosine 0 with every row (its
    unit row stays zero): a zero row of A gets cosine 0.0 and the lowest b (with `same`, the
    lowest b other than itself), and a zero row of B can be the match of a row of A that no
    other row of B meets at a positive cosine.

    `same=True`: B is A (the same tensor) and the diagonal is masked, so each feature's match
    is the closest *other* feature; the dictionary needs two features or more.
    Work: A's rows `block` at a time against B's rows `block` at a time on `device`, so memory
    there is O(block^2 + block x D) (a (block, block) float32 cosine block), besides the result's
    12 bytes a feature of A on the host; B's rows are normalized again for every block of A, a
    few passes of block x D per block pair (about 1/block of its matmul's multiply-adds).
    `progress(done, total)` is called after each block of A.
    """
    _check(W_dec_AD, W_dec_BD, same=same, block=block)
    F_A, F_B = W_dec_AD.shape[0], W_dec_BD.shape[0]
    ids_A, cosines_A = np.empty(F_A, dtype=np.int64), np.empty(F_A, dtype=np.float32)
    total = -(-F_A // block)
    for done, a0 in enumerate(range(0, F_A, block), 1):
        a1 = min(a0 + block, F_A)
        unit_aD = _unit_rows(W_dec_AD[a0:a1], device)
        best_a = torch.full((a1 - a0,), -torch.inf, device=device)
        best_ids_a = torch.zeros(a1 - a0, dtype=torch.int64, device=device)
        for b0 in range(0, F_B, block):
            b1 = min(b0 + block, F_B)
            cos_ab = unit_aD @ _unit_rows(W_dec_BD[b0:b1], device).T
            if same and b0 < a1 and a0 < b1:  # the block holds part of the diagonal
                diag = torch.arange(max(a0, b0), min(a1, b1), device=device)
                cos_ab[diag - a0, diag - b0] = -torch.inf
            value_a, pick_a = cos_ab.max(dim=1)
            better_a = value_a > best_a  # strictly: an equal cosine in a later block keeps the lower b
            best_a = torch.where(better_a, value_a, best_a)
            best_ids_a = torch.where(better_a, pick_a + b0, best_ids_a)
        ids_A[a0:a1] = best_ids_a.cpu().numpy()
        cosines_A[a0:a1] = (best_a + 0.0).cpu().numpy()  # + 0.0: a zero row's -0.0 becomes 0.0
        if progress is not None:
            progress(done, total)
    return ids_A, cosines_A


def _unit_rows(x_ND: torch.Tensor, device: str) -> torch.Tensor:
    """(N, D) float32 unit rows on `device`; a zero row stays zero.

    Each row is first scaled by a power of two (exact) that brings its largest |value| into
    [0.5, 1), so no finite row over- or underflows in the norm whatever its dtype and scale
    (a float32 row of 1e-30s would square to zero), and a row and its multiples by powers of
    two give the same bits. Two factors of 2^(e/2): one 2^e can overflow float32.
    """
    x_ND = x_ND.to(device)
    if x_ND.dtype not in (torch.float32, torch.float64):
        x_ND = x_ND.float()  # bf16, float16: exact in float32
    low_N1, high_N1 = torch.aminmax(x_ND, dim=1, keepdim=True)
    _, exponent_N1 = torch.frexp(torch.maximum(high_N1, -low_N1))  # |peak| = m 2^e, m in [0.5, 1); 0 gives e 0
    one_N1, half_N1 = torch.ones_like(low_N1), exponent_N1 // 2
    x_ND = (x_ND * torch.ldexp(one_N1, -half_N1)).mul_(torch.ldexp(one_N1, half_N1 - exponent_N1)).float()
    return x_ND / x_ND.norm(dim=1, keepdim=True).clamp_min(0.5)  # a nonzero row's norm is at least 0.5


def _check(W_dec_AD: torch.Tensor, W_dec_BD: torch.Tensor, *, same: bool, block: int) -> None:
    """ValueError for inputs closest_features cannot match: shapes, emptiness, NaN/inf, `same` misuse."""
    if W_dec_AD.ndim != 2 or W_dec_BD.ndim != 2:
        raise ValueError(f"decoder matrices must be 2-D (features, d_model): A {tuple(W_dec_AD.shape)}, "
                         f"B {tuple(W_dec_BD.shape)}")
    if W_dec_AD.shape[1] != W_dec_BD.shape[1]:
        raise ValueError(f"decoder widths differ: A {tuple(W_dec_AD.shape)}, B {tuple(W_dec_BD.shape)}")
    if 0 in W_dec_AD.shape or 0 in W_dec_BD.shape:
        raise ValueError(f"empty decoder matrix: A {tuple(W_dec_AD.shape)}, B {tuple(W_dec_BD.shape)}")
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    if same and W_dec_BD is not W_dec_AD and (W_dec_AD.shape != W_dec_BD.shape or not torch.equal(W_dec_AD, W_dec_BD)):
        raise ValueError("same=True needs B to be A: the diagonal is masked as each feature's own row")
    if same and W_dec_AD.shape[0] < 2:
        raise ValueError("same=True needs two features or more: a lone feature has no other feature")
    for name, W in (("A", W_dec_AD), ("B", W_dec_BD)):
        for start in range(0, W.shape[0], block):  # blockwise: no (F, D) mask in memory
            if torch.isfinite(W[start:start + block].sum(dim=1)).all():  # NaN and inf reach the sum
                continue  # (a sum that overflows on finite rows only goes the slow way below)
            bad = (~torch.isfinite(W[start:start + block]).all(dim=1)).nonzero()
            if len(bad):
                raise ValueError(f"decoder matrix {name} {tuple(W.shape)} has NaN or inf, first in row "
                                 f"{start + int(bad[0])}")


def why_not_compared(dictionary: str, other: str, decodes_into: dict[str, str]) -> str | None:
    """Why the cell (dictionary, other) compares nothing, or None: a dictionary against itself
    (the nearest-features panel holds each feature's closest others: F^2 x D again for nothing),
    and two dictionaries whose decoders write different hooks (`decodes_into`: key -> the hook a
    point reconstructs; a transcoder's target), where no cosine means anything."""
    if other == dictionary:
        return "the dictionary itself: site_json's nearest features hold its closest"
    if decodes_into[dictionary] != decodes_into[other]:
        return f"{dictionary} decodes into {decodes_into[dictionary]}, {other} into {decodes_into[other]}"
    return None


def agreement(matches: list[tuple[int, np.ndarray, np.ndarray]],
              cosines_at: tuple[float, ...] = (0.9, 0.7, 0.5)) -> list[dict]:
    """Per other dictionary (its position, its ids_F, its cosines_F): the mean closest-feature
    cosine and the share of this dictionary's features whose closest there is at least each of
    `cosines_at`: how much of one dictionary another one has found."""
    return [{"position": position, "mean": round(float(cosines_F.mean()), 4),
             "share_at_least": {f"{c:g}": round(float((cosines_F >= c).mean()), 4) for c in cosines_at}}
            for position, _, cosines_F in matches if len(cosines_F)]


def feature_closest(matches: list[tuple[int, np.ndarray, np.ndarray]], feature: int) -> list[list]:
    """One feature's closest features: [[position of the other dictionary, its feature, cosine], ...]."""
    return [[position, int(ids_F[feature]), round(float(cosines_F[feature]), 4)] for position, ids_F, cosines_F in matches]


def matches_table(ids: np.ndarray | None = None, cosines: np.ndarray | None = None) -> pa.Table:
    """The matches as stored (MATCHES_SCHEMA): feature 0..F_A-1, its match in B, their cosine
    (none given: the empty table of a cell that compares nothing)."""
    ids = np.zeros(0, np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    cosines = np.zeros(0, np.float32) if cosines is None else np.asarray(cosines, dtype=np.float32)
    if ids.shape != cosines.shape or ids.ndim != 1:
        raise ValueError(f"ids {ids.shape} and cosines {cosines.shape} must be one (F_A,) vector each")
    return pa.table([np.arange(len(ids), dtype=np.int64), ids, cosines], schema=MATCHES_SCHEMA)


def write_matches(table: pa.Table, path) -> None:
    """zstd Parquet of a matches table: ids 0..F_A-1 delta-coded to nearly nothing, the float
    cosines byte-stream-split (their exponent bytes then compress), about 5 bytes a feature."""
    import pyarrow.parquet as pq

    pq.write_table(table, path, use_dictionary=False, compression="zstd",
                   column_encoding={"feature": "DELTA_BINARY_PACKED", "match": "PLAIN",
                                    "cosine": "BYTE_STREAM_SPLIT"})


def read_matches(path, *, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids (A,) int64, cosines (A,) float32) that `write_matches` stored at `path`. A file
    that cannot be read, lacks a column, has other types, or whose rows are not features
    0..F_A-1 in order raises ValueError starting with `where` and naming the file."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{where}: cannot read the matches file {path}: {e}") from e
    wanted = {f.name: f.type for f in MATCHES_SCHEMA}
    found = {name: table.schema.field(name).type for name in table.column_names if name in wanted}
    if found != wanted:
        columns = dict(zip(table.column_names, map(str, table.schema.types)))
        raise ValueError(f"{where}: the matches file {path} has columns {columns}, wanted "
                         f"{ {name: str(t) for name, t in wanted.items()} }")
    nulls = [name for name in wanted if table.column(name).null_count]
    if nulls:
        raise ValueError(f"{where}: the matches file {path} has nulls in {nulls}")
    features = table.column("feature").to_numpy()
    if not np.array_equal(features, np.arange(len(features))):
        raise ValueError(f"{where}: the rows of the matches file {path} are not features 0..{len(features) - 1} "
                         f"in order")
    ids = table.column("match").to_numpy()
    if (ids < 0).any():
        raise ValueError(f"{where}: the matches file {path} has a negative match id {int(ids.min())}")
    return ids, table.column("cosine").to_numpy()

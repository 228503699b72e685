"""Cross-dictionary feature matching (sae_assets/core/features/matches.py) against a brute force.

`closest_features` on tiny random dictionaries, with blocks smaller than either, against the full
cosine matrix in float64 numpy, across dictionaries and within one (diagonal masked); planted
duplicates; the tie rule (lowest b) and the zero-row rule (cosine 0, lowest eligible b) on
exactly representable rows; rows scaled by 2^+-100 (whose squares over- or underflow float32);
the input errors; and the Parquet file: round trip, and a truncated, mistyped or disordered
file read back as a ValueError that names where and the file.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sae_assets.core.features.matches import (closest_features, matches_table, read_matches, why_not_compared,
                                               write_matches)

F_A, F_B, D, BLOCK = 37, 53, 8, 5


def random_rows(F: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((F, D)).astype(np.float32))


def dense_cosines(A: torch.Tensor, B: torch.Tensor) -> np.ndarray:
    """(F_A, F_B) float64: the brute force."""
    a, b = A.double().numpy(), B.double().numpy()
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-300)
    return a @ b.T


def assert_matches_brute_force(ids, cosines, cos_AB: np.ndarray) -> None:
    """Each id is the argmax (exactly, where the best two are more than float32 rounding apart;
    otherwise a maximizer up to that rounding), and each cosine the maximum."""
    assert ids.dtype == np.int64 and cosines.dtype == np.float32 and ids.shape == cosines.shape == (len(cos_AB),)
    best = cos_AB.max(axis=1)
    np.testing.assert_allclose(cosines, best, atol=1e-6)
    np.testing.assert_allclose(cos_AB[np.arange(len(ids)), ids], best, atol=1e-6)
    second = np.sort(cos_AB, axis=1)[:, -2]
    clear = best - second > 1e-5
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(ids[clear], cos_AB.argmax(axis=1)[clear])


@pytest.mark.parametrize("block", [BLOCK, 1, 16, 4096])
def test_closest_features_match_the_dense_cosine_matrix(block):
    A, B = random_rows(F_A, 0), random_rows(F_B, 1)
    ids, cosines = closest_features(A, B, block=block)
    assert_matches_brute_force(ids, cosines, dense_cosines(A, B))


@pytest.mark.parametrize("block", [BLOCK, 1, 16, 4096])
def test_closest_other_feature_within_a_dictionary_masks_the_diagonal(block):
    A = random_rows(F_B, 2)
    ids, cosines = closest_features(A, A, same=True, block=block)
    cos_AA = dense_cosines(A, A)
    np.fill_diagonal(cos_AA, -np.inf)
    assert (ids != np.arange(F_B)).all()
    assert_matches_brute_force(ids, cosines, cos_AA)


def test_planted_duplicates_are_found_with_cosine_one():
    A, B = random_rows(F_A, 3), random_rows(F_B, 4)
    B[19] = 2.5 * A[3]
    ids, cosines = closest_features(A, B, block=BLOCK)
    assert ids[3] == 19 and abs(cosines[3] - 1) < 1e-6
    A[10] = 0.5 * A[3]  # within one dictionary: 3 and 10 are each other's closest
    ids, cosines = closest_features(A, A, same=True, block=BLOCK)
    assert (ids[3], ids[10]) == (10, 3) and abs(cosines[3] - 1) < 1e-6 and abs(cosines[10] - 1) < 1e-6


def test_ties_go_to_the_lowest_b_within_and_across_blocks():
    # Every other row of B points away from A[0] = e0 + e1; rows 2, 4, 7, 8 and 11 (blocks 0, 0,
    # 1, 1, 2 at block 5) are multiples of e0 or e1, each at exactly cos 1/sqrt(2) in any order.
    A, B = random_rows(F_A, 5), -random_rows(F_B, 6).abs()
    A[0] = 0
    A[0, :2] = 1
    e0, e1 = torch.eye(D)[0], torch.eye(D)[1]
    for b, row in ((11, 5 * e1), (8, e0), (7, e1), (4, 3 * e0), (2, e1)):
        B[b] = row
    for block in (BLOCK, 1, 3, 100):
        ids, cosines = closest_features(A, B, block=block)
        assert ids[0] == 2 and cosines[0] == np.float32(1 / np.sqrt(2)), block
    B[2] = B[4] = -1  # the tie now between 7 (block 1) and 8
    assert closest_features(A, B, block=BLOCK)[0][0] == 7


def test_a_zero_row_has_cosine_zero_and_the_lowest_eligible_match():
    A, B = random_rows(F_A, 7), random_rows(F_B, 8)
    A[3] = 0
    ids, cosines = closest_features(A, B, block=BLOCK)
    assert ids[3] == 0 and cosines[3] == 0 and not np.signbit(cosines[3])
    A[0] = 0  # within one dictionary: the lowest b other than itself
    ids, cosines = closest_features(A, A, same=True, block=BLOCK)
    assert (ids[0], ids[3]) == (1, 0) and cosines[0] == cosines[3] == 0
    # a zero row of B is the match of a row that every other row of B meets at a negative cosine
    B = -random_rows(F_B, 9).abs()
    B[6] = 0
    A[5] = torch.eye(D)[0]
    ids, cosines = closest_features(A, B, block=BLOCK)
    assert ids[5] == 6 and cosines[5] == 0


def test_rows_at_extreme_scales_match_as_at_unit_scale():
    A, B = random_rows(F_A, 10), random_rows(F_B, 11)
    ids, cosines = closest_features(A, B, block=BLOCK)
    for scale in (2.0 ** -100, 2.0 ** 100):  # their squares under- or overflow float32
        scaled = closest_features(A * scale, B * scale, block=BLOCK)
        np.testing.assert_array_equal(scaled[0], ids)
        np.testing.assert_array_equal(scaled[1], cosines)
    bf16 = closest_features(A.bfloat16(), B.bfloat16(), block=BLOCK)
    assert_matches_brute_force(*bf16, dense_cosines(A.bfloat16().float(), B.bfloat16().float()))


def test_progress_is_called_after_each_block_of_a():
    calls = []
    closest_features(random_rows(F_A, 12), random_rows(F_B, 13), block=BLOCK, progress=lambda *c: calls.append(c))
    assert calls == [(i, 8) for i in range(1, 9)]


def test_bad_inputs_raise_naming_what_is_wrong():
    A, B = random_rows(F_A, 14), random_rows(F_B, 15)
    with pytest.raises(ValueError, match=r"widths differ: A \(37, 8\), B \(53, 9\)"):
        closest_features(A, torch.zeros(F_B, D + 1))
    B[7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"matrix B \(53, 8\) has NaN or inf, first in row 7"):
        closest_features(A, B, block=BLOCK)
    A[12, 0], A[30, 1] = float("inf"), float("nan")
    with pytest.raises(ValueError, match=r"matrix A \(37, 8\) has NaN or inf, first in row 12"):
        closest_features(A, B, block=BLOCK)
    for empty_A, empty_B in ((torch.zeros(0, D), B), (A, torch.zeros(0, D)), (torch.zeros(4, 0), torch.zeros(4, 0))):
        with pytest.raises(ValueError, match="empty"):
            closest_features(empty_A, empty_B)
    with pytest.raises(ValueError, match="same=True needs B to be A"):
        closest_features(random_rows(F_A, 16), random_rows(F_A, 17), same=True)
    with pytest.raises(ValueError, match="two features or more"):
        closest_features(torch.ones(1, D), torch.ones(1, D), same=True)


def test_parquet_round_trip(tmp_path):
    ids, cosines = closest_features(random_rows(F_A, 18), random_rows(F_B, 19), block=BLOCK)
    table = matches_table(ids, cosines)
    assert table.column_names == ["feature", "match", "cosine"]
    assert [str(t) for t in table.schema.types] == ["int64", "int64", "float"]
    np.testing.assert_array_equal(table.column("feature").to_numpy(), np.arange(F_A))
    write_matches(table, tmp_path / "matches.parquet")
    back_ids, back_cosines = read_matches(tmp_path / "matches.parquet", where="test")
    np.testing.assert_array_equal(back_ids, ids)
    np.testing.assert_array_equal(back_cosines, cosines)
    assert back_ids.dtype == np.int64 and back_cosines.dtype == np.float32


def test_unreadable_files_raise_naming_where_and_the_file(tmp_path):
    path = tmp_path / "matches.parquet"
    table = matches_table(*closest_features(random_rows(F_A, 20), random_rows(F_B, 21), block=BLOCK))
    write_matches(table, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 5, 3, 0):
        path.write_bytes(data[:cut])
        unreadable = r"^feature_matches\[a,b\]: cannot read the matches file .*matches\.parquet"
        with pytest.raises(ValueError, match=unreadable):
            read_matches(path, where="feature_matches[a,b]")
    with pytest.raises(ValueError, match=r"^where: cannot read the matches file .*missing\.parquet"):
        read_matches(tmp_path / "missing.parquet", where="where")
    for bad in (table.drop_columns(["cosine"]),
                table.set_column(2, "cosine", table.column("cosine").cast(pa.float64())),
                table.set_column(1, "match", table.column("match").cast(pa.int32()))):
        pq.write_table(bad, path)
        with pytest.raises(ValueError, match=r"^where: the matches file .*matches\.parquet has columns"):
            read_matches(path, where="where")
    pq.write_table(table.take(np.r_[1, 0, 2:F_A]), path)
    with pytest.raises(ValueError, match=r"^where: the rows of the matches file .* are not features 0\.\.36 in order"):
        read_matches(path, where="where")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_matches():
    A, B = random_rows(F_A, 22), random_rows(F_B, 23)
    ids, cosines = closest_features(A, B, block=BLOCK, device="cuda")
    assert_matches_brute_force(ids, cosines, dense_cosines(A, B))


def test_why_a_cell_compares_nothing():
    decodes_into = {"a": "blocks.0.hook_resid_post", "b": "blocks.0.hook_resid_post", "t": "blocks.0.hook_mlp_out"}
    assert why_not_compared("a", "b", decodes_into) is None
    assert "itself" in why_not_compared("a", "a", decodes_into)
    assert why_not_compared("a", "t", decodes_into) == "a decodes into blocks.0.hook_resid_post, t into blocks.0.hook_mlp_out"
    assert matches_table().num_rows == 0

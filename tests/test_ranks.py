"""Rank measures against the reference definitions, on matrices with planted spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.ranks import (
    compute_rank_decay_dynamics,
    dynamics_metric_names,
    rank_measures,
    rank_measures_batched,
)


def planted(spectrum: list[float], b: int = 40, d: int = 60, seed: int = 0) -> torch.Tensor:
    """X = U diag(s) V^T with orthonormal U (b x r), V (d x r): its singular values are s."""
    g = torch.Generator().manual_seed(seed)
    r = len(spectrum)
    u, _ = torch.linalg.qr(torch.randn(b, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ v.T


def reference(s: list[float], prop: float = 0.99, eps: float = 0.01) -> dict[str, float]:
    """The definitions, written out one loop at a time."""
    s = sorted(s, reverse=True)
    total = sum(s)
    entropy = -sum((x / total) * math.log(x / total) for x in s if x > 0)

    def smallest(values):
        acc, whole = 0.0, sum(values)
        for k, x in enumerate(values, 1):
            acc += x
            if acc / whole >= prop - 1e-12:
                return k
        return len(values)

    return {
        "effective_rank": math.exp(entropy),
        "approximate_rank": smallest([x * x for x in s]),
        "l1_distribution_rank": smallest(s),
        "numerical_rank": sum(1 for x in s if x > eps * s[0]),
    }


SPECTRA = [
    [10.0, 5.0, 2.0, 1.0, 0.5],
    [1.0] * 12,
    [100.0, 1.5, 0.5, 0.001],  # not 1.0: exactly eps * sigma_max is a tie rounding decides
    list(np.geomspace(1, 1e-4, 30)),
    [3.0],
]


@pytest.mark.parametrize("spectrum", SPECTRA)
def test_measures_match_the_definitions(spectrum):
    x = planted(spectrum)
    got = rank_measures(x)
    # the planted matrix has min(B, D) - r extra zero singular values: they count as zeros
    want = reference(spectrum + [0.0] * (40 - len(spectrum)))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize(
    "spectrum, b, d",
    [(s, 36, 200) for s in SPECTRA] + [(list(np.geomspace(1, 1e-7, 60)), 256, 1024)],
)
def test_wide_features_agree(spectrum, b, d):
    # wide features with a 1e-7 spread: a Gram-matrix shortcut was off by 9e-5 here
    x = planted(spectrum, b=b, d=d)
    want = reference(spectrum + [0.0] * (b - len(spectrum)))
    got = rank_measures(x)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_thresholds_are_parameters():
    x = planted([10.0, 5.0, 2.0, 1.0, 0.5])
    loose = rank_measures(x, prop=0.9, eps=0.15)
    assert loose["approximate_rank"] == reference([10, 5, 2, 1, 0.5], prop=0.9)["approximate_rank"]
    assert loose["numerical_rank"] == 3  # eps * sigma_max = 1.5: 10, 5 and 2 are above it


def test_prop_one_never_exceeds_min_shape():
    x = planted([1.0] * 10, b=10, d=30)
    got = rank_measures(x, prop=1.0)
    assert got["approximate_rank"] == got["l1_distribution_rank"] == 10


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(8, 5), torch.full((8, 5), float("nan")), torch.tensor([[1.0, float("inf")]] * 3)],
)
def test_degenerate_input_is_nan_never_zero(bad):
    with pytest.warns(RuntimeWarning, match="NaN"):
        got = rank_measures(bad)
    assert all(math.isnan(v) for v in got.values())


def test_conv_maps_are_flattened_and_batched_form_agrees():
    g = torch.Generator().manual_seed(0)
    layers = {
        "conv": torch.randn(16, 3, 4, 4, generator=g),
        "fc1": torch.randn(16, 32, generator=g),
        "fc2": torch.randn(16, 3, generator=g) @ torch.randn(3, 32, generator=g),  # rank 3
        "dead": torch.zeros(16, 8),
    }
    with pytest.warns(RuntimeWarning, match="layer 3"):
        batched = rank_measures_batched(layers)
    for i, (name, x) in enumerate(layers.items()):
        if name == "dead":
            assert all(math.isnan(batched[k][i]) for k in batched)
            continue
        single = rank_measures(x)
        if name == "fc2":
            assert single["numerical_rank"] == 3
        for k, v in single.items():
            assert batched[k][i] == pytest.approx(v, abs=1e-9)


def test_dynamics_by_hand():
    # ranks 10 -> 8 -> 8 -> 2: drops 2, 0, 6 (n = 3)
    got = compute_rank_decay_dynamics([10, 8, 8, 2])
    d = sorted([2.0, 0.0, 6.0])
    gini = sum((2 * k - 3 - 1) * x for k, x in enumerate(d, 1)) / (3 * 8)
    assert got["rank_drop_gini"] == pytest.approx(gini)
    assert got["rank_decay_centroid"] == pytest.approx((1 * 2 + 3 * 6) / 8)
    assert got["normalized_aurc"] == pytest.approx((1 + 0.8 + 0.8 + 0.8 + 0.8 + 0.2) / 6)
    ratio = compute_rank_decay_dynamics([10, 8, 8, 2], mode="ratio")
    assert ratio["rank_decay_centroid"] == pytest.approx((1 * 0.2 + 3 * 0.75) / 0.95)
    assert ratio["normalized_aurc"] == got["normalized_aurc"]  # mode-independent


def test_dynamics_edge_cases():
    flat = compute_rank_decay_dynamics([5, 5, 5])
    assert math.isnan(flat["rank_drop_gini"]) and math.isnan(flat["rank_decay_centroid"])
    assert flat["normalized_aurc"] == 1.0
    rising = compute_rank_decay_dynamics([2, 4, 1])  # mixed signs: only drops count
    assert 0 <= rising["rank_drop_gini"] <= 0.5
    assert math.isnan(compute_rank_decay_dynamics([0, 0])["normalized_aurc"])
    assert math.isnan(compute_rank_decay_dynamics([7])["rank_drop_gini"])
    # one big drop among n transitions: the Gini maximum (n - 1) / n
    assert compute_rank_decay_dynamics([9, 9, 9, 1])["rank_drop_gini"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="mode"):
        compute_rank_decay_dynamics([3, 2], mode="log")


def test_input_rank_is_prepended():
    with_input = compute_rank_decay_dynamics([8, 4], input_rank=16)
    assert with_input == compute_rank_decay_dynamics([16, 8, 4])


def test_vectorised_over_steps_matches_one_step_at_a_time():
    rng = np.random.default_rng(0)
    table = rng.integers(1, 64, size=(200, 6)).astype(float)
    table[5, 2] = np.nan
    vec = compute_rank_decay_dynamics(table, mode="ratio", input_rank=np.full(200, 64.0))
    for i in (0, 5, 17, 199):
        one = compute_rank_decay_dynamics(table[i], mode="ratio", input_rank=64.0)
        for k, v in one.items():
            np.testing.assert_allclose(vec[k][i], v, equal_nan=True)


def test_metric_names():
    names = dynamics_metric_names()
    assert len(names) == 12 and "effective_rank_rank_drop_gini" in names
    assert "numerical_rank_normalized_aurc" in names


@pytest.mark.parametrize("mode", ["difference", "ratio"])
def test_many_rows_in_blocks_equal_row_by_row(mode):
    rng = np.random.default_rng(0)
    table = np.sort(rng.uniform(0, 50, size=(70_000, 6)), axis=1)[:, ::-1].copy()
    table[5, 2] = np.nan  # NaN rows stay NaN, in whichever block they fall
    table[40_000] = 3.0  # no drop
    whole = compute_rank_decay_dynamics(table, mode=mode)
    for i in (0, 5, 32_767, 32_768, 40_000, 69_999):
        one = compute_rank_decay_dynamics(table[i], mode=mode)
        for key, value in one.items():
            np.testing.assert_allclose(whole[key][i], value, rtol=1e-12)  # NaN == NaN here

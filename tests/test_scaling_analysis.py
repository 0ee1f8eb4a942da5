"""analysis.scaling_fit and the scaling_analysis CLI, over synthetic sweeps with a known optimum."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.scaling_fit import (
    analyze,
    bootstrap_beta,
    fit_power_law,
    interpret,
    load_results,
    lr_opt_per_batch,
    paired_family_difference,
    refine_minimum,
    validate_results,
)
from common.cli import UserError

REPO = Path(__file__).resolve().parents[1]
LRS = [3.0e-5, 7.9e-5, 2.1e-4, 5.5e-4, 1.4e-3, 3.8e-3, 1.0e-2]  # the sweep's default grid
BATCH_SIZES = [8, 16, 32, 64, 128, 256, 512]
OUTPUTS = ("scaling_fit.json", "lr_opt_vs_batch.png", "loss_vs_lr.png", "final_loss_heatmap.png")


def surface(
    beta: float = 0.6,
    lr8: float = 1.6e-4,
    k: float = 1.0,
    jitter: float = 0.02,
    seeds: tuple[int, ...] = (0, 1, 2),
    noise: str = "gaussian",
    rng_seed: int = 0,
    batch_sizes: list[int] = BATCH_SIZES,
) -> pd.DataFrame:
    """results.csv rows from a known surface: lr_opt(B) = lr8 * (B/8)^beta, off the grid;
    loss = L0(B) * (1 + k (log10 lr - log10 lr_opt)^2) * exp(seed offset + cell jitter)."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for batch in batch_sizes:
        log_opt = math.log10(lr8 * (batch / 8) ** beta)
        for seed in seeds:
            offset = rng.normal(0.0, 0.05)
            for lr in LRS:
                d = math.log10(lr) - log_opt
                loss = (
                    (1 + batch**-0.5) * (1 + k * d * d) * math.exp(offset + rng.normal(0, jitter))
                )
                rows.append(
                    {
                        "batch_size": batch,
                        "lr": lr,
                        "seed": seed,
                        "noise": noise,
                        "optimizer": "adam",
                        "final_train_loss": loss,
                        "final_val_loss": loss,
                        "min_val_loss": loss,
                        "converged": True,
                        "diverged": False,
                        "steps": 100,
                        "wall_time_s": 0.1,
                    }
                )
    return pd.DataFrame(rows)


def _mean_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["level"] == "mean"].set_index("batch_size")


# ---------------------------------------------------------------------------------------------
# The refinement itself


def test_refine_minimum_recovers_an_exact_parabola_vertex():
    x = np.log10(LRS)
    y = 2.0 * (x - (-3.1)) ** 2 + 1.0
    r = refine_minimum(y, x)
    assert r["x_opt"] == pytest.approx(-3.1, abs=1e-9)
    assert not r["non_convex"] and not r["edge"] and r["n_points"] == 3
    r5 = refine_minimum(y, x, window=5)
    assert r5["x_opt"] == pytest.approx(-3.1, abs=1e-9) and r5["n_points"] == 5


def test_refine_minimum_flags_a_concave_window_and_falls_back_to_the_grid():
    x = np.log10(LRS)
    w_shape = np.array([9.0, 1.2, 2.0, 1.0, 2.0, 1.2, 9.0])  # 5-point window is concave
    r = refine_minimum(w_shape, x, window=5)
    assert r["non_convex"] and r["x_opt"] == pytest.approx(x[3])
    # Left neighbour diverged: the one-sided window (2, 3, 4) puts the vertex outside it.
    one_sided = np.array([5.0, np.nan, 1.0, 2.0, 3.5, 5.0, 6.0])
    r = refine_minimum(one_sided, x, np.isnan(one_sided))
    assert r["non_convex"] and r["diverged_neighbour"] and r["x_opt"] == pytest.approx(x[2])
    edge = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    r = refine_minimum(edge, x)
    assert (
        r["edge"] and r["non_convex"] and r["n_points"] == 3 and r["x_opt"] == pytest.approx(x[0])
    )
    holes = np.array([5.0, np.nan, 1.0, np.nan, 4.0, 5.0, 6.0])  # both neighbours missing
    diverged = np.isnan(holes)
    r = refine_minimum(holes, x, diverged)
    assert r["few_points"] and r["diverged_neighbour"] and r["n_points"] == 1


def test_refine_minimum_over_leading_axes_matches_one_curve_at_a_time():
    x = np.log10(LRS)
    nan = np.nan
    curves = np.array(
        [
            [
                2.0 * (x - (-3.1)) ** 2 + 1.0,  # an exact parabola
                [5.0, nan, 1.0, 2.0, 3.5, 5.0, 6.0],  # left neighbour diverged
                [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],  # argmin on the first lr
            ],
            [
                [6.0, 5.0, 4.0, 3.0, 1.0, nan, 9.0],  # right neighbour diverged
                [3.0, 1.0, 2.0, 4.0, 8.0, 9.0, 9.5],  # one point left of the argmin
                [nan] * 7,  # every lr diverged
            ],
        ]
    )
    for window in (3, 5):
        for diverged in (None, np.isnan(curves)):
            batched = refine_minimum(curves, x, diverged, window)
            for index in np.ndindex(curves.shape[:-1]):
                one = refine_minimum(
                    curves[index], x, None if diverged is None else diverged[index], window
                )
                for key, value in one.items():
                    assert batched[key].shape == curves.shape[:-1]
                    np.testing.assert_array_equal(batched[key][index], value, err_msg=key)
    r = refine_minimum(curves, x, np.isnan(curves), window=5)
    assert r["y_opt"][0, 0] == pytest.approx(1.0) and r["x_grid"][0, 0] == x[3]
    assert r["diverged_neighbour"].tolist() == [[False, True, False], [True, False, False]]
    assert not refine_minimum(curves, x, None, window=5)["diverged_neighbour"].any()
    # A side cut short by the grid edge or a diverged cell: the window grows on the other side.
    assert r["n_points"].tolist() == [[5, 5, 5], [5, 5, 0]]
    assert r["has_min"].tolist() == [[True, True, True], [True, True, False]]
    assert np.isnan([r["x_opt"][1, 2], r["x_grid"][1, 2], r["y_opt"][1, 2]]).all()
    assert not any(r[flag][1, 2] for flag in ("edge", "non_convex", "few_points"))
    with pytest.raises(ValueError, match="^window must be 3 or 5 points, not 4$"):
        refine_minimum(curves, x, window=4)


# ---------------------------------------------------------------------------------------------
# Beta recovery (the acceptance test)


def test_beta_recovered_off_grid_where_plain_argmin_fails():
    df = validate_results(surface(beta=0.6))
    table = lr_opt_per_batch(df)
    mean = _mean_rows(table)
    assert not mean["flags"].astype(bool).any()
    refined = fit_power_law(mean.index, mean["lr_opt"])
    argmin = fit_power_law(mean.index, mean["lr_grid_argmin"])
    boot = bootstrap_beta(df, n_boot=2000, seed=0)
    assert abs(refined["beta"] - 0.6) <= 0.03
    assert boot["beta"] == pytest.approx(refined["beta"])
    low, high = boot["beta_ci"]
    assert low <= 0.6 <= high
    # The grid argmin quantises lr_opt: on this surface its beta is off by ~0.1.
    assert abs(argmin["beta"] - 0.6) > 0.05
    assert abs(argmin["beta"] - 0.6) > 3 * abs(refined["beta"] - 0.6)
    # Per seed: one row per (batch size, seed) too, each near the truth.
    per_seed = table[table["level"] == "seed"]
    assert len(per_seed) == len(BATCH_SIZES) * 3
    truth = np.log10(1.6e-4 * (per_seed["batch_size"] / 8) ** 0.6)
    assert np.abs(per_seed["log10_lr_opt"] - truth).max() < 0.1


def test_bootstrap_is_fast():
    df = validate_results(surface())
    start = time.perf_counter()
    boot = bootstrap_beta(df, n_boot=2000, seed=1)
    assert time.perf_counter() - start < 5.0
    assert boot["n_boot_valid"] == 2000


def test_two_families_recovered_and_their_difference_excludes_zero():
    df = validate_results(
        pd.concat(
            [
                surface(beta=0.5, noise="gaussian", rng_seed=1),
                surface(beta=0.7, noise="laplace", rng_seed=2),
            ]
        )
    )
    result = analyze(df, n_boot=1000, seed=0)
    assert result["primary_family"] == "gaussian"
    fams = result["families"]
    assert abs(fams["gaussian"]["beta"] - 0.5) <= 0.03
    assert abs(fams["laplace"]["beta"] - 0.7) <= 0.03
    assert result["beta"] == fams["gaussian"]["beta"]
    diff = result["differences"]["laplace - gaussian"]
    assert diff["paired"]
    assert diff["estimate"] == pytest.approx(fams["laplace"]["beta"] - fams["gaussian"]["beta"])
    assert diff["ci"][0] > 0
    text = interpret(result)
    assert "excludes 0" in text


def test_the_report_lays_out_every_family_pair_and_its_choices():
    df = pd.concat(
        [
            surface(beta=0.5, noise="uniform", rng_seed=1),
            surface(beta=0.7, noise="laplace", rng_seed=2, seeds=(0, 1)),
            surface(beta=0.6, noise="student", rng_seed=3, seeds=(1, 2, 3)),
        ],
        ignore_index=True,
    )
    result = analyze(df, n_boot=50, window=5, include_flagged=True)
    summary = ["beta", "beta_se", "beta_ci", "beta_boot_se", "r2", "intercept", "n_boot",
               "n_boot_valid", "lr_opt", "excluded_batch_sizes", "used_batch_sizes",
               "all_flagged_used"]  # fmt: skip
    assert list(result) == [
        "primary_family", "loss", "include_flagged", "window", *summary, "families",
        "differences", "unfinished_rows", "reference_slopes", "notes",
    ]  # fmt: skip
    # No gaussian family: the first in sorted order is primary, and b in its pairs.
    assert result["primary_family"] == "laplace"
    assert result["loss"] == "final_val_loss" and result["include_flagged"]
    assert result["window"] == 5
    fams = result["families"]
    assert list(fams) == ["laplace", "student", "uniform"]
    assert all(result[key] == fams["laplace"][key] for key in summary)
    diffs = result["differences"]
    assert list(diffs) == ["student - laplace", "uniform - laplace", "uniform - student"]
    for key, diff in diffs.items():
        a, b = key.split(" - ")
        assert (diff["a"], diff["b"]) == (a, b)
        assert diff["estimate"] == pytest.approx(fams[a]["beta"] - fams[b]["beta"])
        assert len(diff["ci"]) == 2 and diff["n_boot"] == 50
    assert diffs["student - laplace"]["shared_seeds"] == [1]
    assert not diffs["student - laplace"]["paired"] and diffs["uniform - student"]["paired"]
    assert result["unfinished_rows"] == []
    assert result["reference_slopes"] == {
        "0.5": "square-root / Adam SDE",
        "0.67": 'the old "Laplace" claim',
        "1.0": "linear",
    }
    assert result["notes"][0].startswith("lr_opt: grid argmin of the seed-mean log loss, refined")
    assert "over the 5 contiguous stable points around it;" in result["notes"][0]
    assert result["notes"][3:] == [
        "edge-flagged batch sizes are excluded from the fit (not: include_flagged)",
        "top-level keys describe the 'laplace' family; families are not pooled",
    ]
    default = analyze(df, n_boot=20)
    assert default["window"] == 3 and not default["include_flagged"]
    assert default["notes"][3] == "edge-flagged batch sizes are excluded from the fit"


def test_identical_families_difference_includes_zero():
    df = validate_results(
        pd.concat(
            [
                surface(beta=0.6, noise="gaussian", rng_seed=3),
                surface(beta=0.6, noise="laplace", rng_seed=4),
            ]
        )
    )
    diff = paired_family_difference(df, "laplace", "gaussian", n_boot=1000, seed=0)
    assert diff["paired"] and diff["shared_seeds"] == [0, 1, 2]
    assert diff["ci"][0] <= 0 <= diff["ci"][1]
    assert abs(diff["estimate"]) < 0.03


# ---------------------------------------------------------------------------------------------
# Flags


def test_optimum_beyond_the_grid_edge_is_flagged_and_excluded():
    # lr_opt(512) = 2e-4 * 64 = 1.3e-2 > 1e-2: the largest batch's optimum is off the grid.
    df = validate_results(surface(beta=1.0, lr8=2.0e-4, k=1.0))
    mean = _mean_rows(lr_opt_per_batch(df))
    assert mean.loc[512, "edge"] and "edge" in mean.loc[512, "flags"]
    assert not mean.loc[64, "edge"]
    result = analyze(df, n_boot=200)
    assert 512 in result["excluded_batch_sizes"]
    assert 512 not in result["used_batch_sizes"]
    assert abs(result["beta"] - 1.0) <= 0.05
    assert "edge" in interpret(result)
    kept = analyze(df, n_boot=200, include_flagged=True)
    assert kept["excluded_batch_sizes"] == []


def test_all_edge_falls_back_to_every_batch_size_and_says_so():
    df = validate_results(surface(beta=0.0, lr8=1.0e-5))  # every optimum below the grid
    result = analyze(df, n_boot=100)
    assert result["all_flagged_used"]
    assert result["excluded_batch_sizes"] == []
    assert "unreliable" in interpret(result)


def test_diverged_neighbour_flagged_and_excluded_never_filled():
    df = surface(beta=0.6)
    log_opt64 = math.log10(1.6e-4 * 8**0.6)
    argmin = int(np.argmin(np.abs(np.log10(LRS) - log_opt64)))
    hit = (df["batch_size"] == 64) & (df["lr"] == LRS[argmin + 1]) & (df["seed"] == 1)
    df.loc[hit, "diverged"] = True
    df.loc[hit, "final_val_loss"] = 1e6  # a diverged row's loss must not be used
    mean = _mean_rows(lr_opt_per_batch(validate_results(df)))
    assert mean.loc[64, "diverged_neighbour"]
    assert mean.loc[64, "lr_max_stable"] == pytest.approx(LRS[argmin])
    assert mean.loc[64, "lr_grid_argmin"] == pytest.approx(LRS[argmin])
    assert mean.loc[32, "lr_max_stable"] == pytest.approx(LRS[-1])


def test_nan_rows_count_as_diverged_and_do_not_crash(tmp_path):
    df = surface(beta=0.6).astype({"diverged": object, "converged": object})
    df.loc[5, "final_val_loss"] = np.nan  # NaN loss, diverged column still False
    df.loc[17, "final_val_loss"] = np.inf
    df.loc[30, "batch_size"] = np.nan  # a row without a batch size is dropped
    df.loc[40, ["final_val_loss", "diverged", "converged"]] = np.nan
    path = tmp_path / "results.csv"
    df.to_csv(path, index=False)
    loaded = load_results(path)
    assert len(loaded) == len(df) - 1
    assert not loaded["stable"][loaded["final_val_loss"].isna()].any()
    result = analyze(loaded, n_boot=200)
    assert abs(result["beta"] - 0.6) <= 0.05
    json.dumps(result, default=str)


def test_interpret_says_no_more_than_the_interval():
    df = validate_results(surface(beta=0.6))
    result = analyze(df, n_boot=100)
    for fam in [result, *result["families"].values()]:
        fam["beta_ci"] = [0.45, 0.75]
    text = interpret(result)
    assert "cannot distinguish 0.5 from 0.67" in text
    assert "excludes 1" in text


# ---------------------------------------------------------------------------------------------
# Bad input


def _write(tmp_path: Path, df: pd.DataFrame) -> Path:
    path = tmp_path / "results.csv"
    df.to_csv(path, index=False)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_results(tmp_path / "nope.csv")


def test_empty_file(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("")
    with pytest.raises(UserError, match="empty"):
        load_results(path)


def test_header_only_file(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(",".join(surface().columns) + "\n")
    with pytest.raises(UserError, match="no rows"):
        load_results(path)


def test_missing_column_is_named(tmp_path):
    path = _write(tmp_path, surface().drop(columns=["final_val_loss"]))
    with pytest.raises(UserError, match="final_val_loss"):
        load_results(path)
    path = _write(tmp_path, surface().drop(columns=["min_val_loss"]))
    with pytest.raises(UserError, match="min_val_loss"):
        load_results(path, loss="min_val_loss")


def test_single_batch_size(tmp_path):
    path = _write(tmp_path, surface(batch_sizes=[64]))
    with pytest.raises(UserError, match="at least two batch sizes"):
        load_results(path)


def test_every_cell_diverged(tmp_path):
    df = surface()
    df["diverged"] = True
    df.loc[::2, "final_val_loss"] = np.nan
    with pytest.raises(UserError, match="every cell .* diverged"):
        load_results(_write(tmp_path, df))


def test_mixed_optimizers_refused(tmp_path):
    df = surface()
    df.loc[df["batch_size"] == 8, "optimizer"] = "sgd"
    with pytest.raises(UserError, match="optimizer"):
        load_results(_write(tmp_path, df))


# ---------------------------------------------------------------------------------------------
# The CLI


def _cli(*args: str, module: bool = False) -> subprocess.CompletedProcess[str]:
    head = ["-m", "analysis.scaling_analysis"] if module else ["analysis/scaling_analysis.py"]
    return subprocess.run(
        [sys.executable, *head, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_writes_the_four_files(tmp_path):
    df = pd.concat([surface(noise="gaussian"), surface(noise="laplace", rng_seed=5)])
    results = _write(tmp_path, df)
    proc = _cli("--results", str(results), "--n-boot", "200")
    assert proc.returncode == 0, proc.stderr
    for name in OUTPUTS:
        assert (tmp_path / name).stat().st_size > 0
        assert f"wrote {tmp_path / name}" in proc.stdout
    assert "beta = " in proc.stdout and "laplace - gaussian" in proc.stdout
    fit = json.loads((tmp_path / "scaling_fit.json").read_text())
    assert abs(fit["beta"] - 0.6) <= 0.03 and fit["n_boot"] == 200
    assert {r["batch_size"] for r in fit["lr_opt"]} == set(BATCH_SIZES)
    assert set(fit["families"]) == {"gaussian", "laplace"}


def test_cli_as_module_with_out_dir(tmp_path):
    results = _write(tmp_path, surface())
    out = tmp_path / "report"
    proc = _cli("--results", str(results), "--out", str(out), "--n-boot", "50", module=True)
    assert proc.returncode == 0, proc.stderr
    assert all((out / name).is_file() for name in OUTPUTS)
    assert not (tmp_path / "scaling_fit.json").exists()


@pytest.mark.parametrize("problem", ["missing_column", "missing_file"])
def test_cli_bad_input_exits_2_with_one_error_line(tmp_path, problem):
    if problem == "missing_column":
        results = _write(tmp_path, surface().drop(columns=["lr"]))
    else:
        results = tmp_path / "absent.csv"
    proc = _cli("--results", str(results), "--n-boot", "10")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert not any((tmp_path / name).exists() for name in OUTPUTS)


def test_one_seed_gives_no_interval_and_says_so():
    """Resampling a single seed repeats it: no zero-width interval may pass for certainty."""
    result = analyze(surface(beta=0.6, seeds=(0,)), n_boot=200)
    assert all(x is None or math.isnan(x) for x in result["beta_ci"])
    assert abs(result["beta"] - 0.6) <= 0.05
    assert "no interval" in interpret(result) and "grid.seeds" in interpret(result)


# ---------------------------------------------------------------------------------------------
# Bad cells, cut rows, repeats, designs without a slope, a full disk: refused before writing


def _edit_line(path: Path, number: int, column: str, value: str) -> None:
    """Set ``column`` of file line ``number`` (the header is line 1) to ``value`` as text."""
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    fields = lines[number - 1].split(",")
    fields[header.index(column)] = value
    lines[number - 1] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")


def _refused(proc: subprocess.CompletedProcess[str], folder: Path, *words: str) -> str:
    """One error line holding every word, exit 2, and no output written."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not [p.name for p in folder.iterdir() if p.name != "results.csv"]
    return lines[0]


@pytest.mark.parametrize(
    ("column", "value"),
    [("final_val_loss", "0.3x"), ("lr", "1e-3!"), ("batch_size", "eight"), ("diverged", "maybe")],
)
def test_a_cell_that_is_no_number_is_refused_naming_its_line(tmp_path, column, value):
    """Today 0.3x in final_val_loss reads as a diverged cell: beta moves, exit 0."""
    results = _write(tmp_path, surface())
    _edit_line(results, 22, column, value)
    _refused(_cli("--results", str(results), "--n-boot", "10"), tmp_path, "line 22", value)


@pytest.mark.parametrize(
    ("column", "value", "words"),
    [("batch_size", "8.5", "whole number"), ("lr", "inf", "finite"), ("seed", "0.5", "whole")],
)
def test_a_value_that_cannot_be_a_grid_point_is_refused(tmp_path, column, value, words):
    results = _write(tmp_path, surface())
    _edit_line(results, 9, column, value)
    _refused(_cli("--results", str(results), "--n-boot", "10"), tmp_path, "line 9", words)


def test_the_diverged_marker_stays_a_result(tmp_path):
    """What the sweep writes for a diverged cell (status diverged, diverged True, no loss) is
    counted as diverged and reported, not refused."""
    df = surface()
    df["status"] = "finished"
    hit = (df["batch_size"] == 8) & (df["lr"] == LRS[-1])
    df.loc[hit, ["status", "diverged", "final_val_loss"]] = ["diverged", True, np.nan]
    results = _write(tmp_path, df)
    proc = _cli("--results", str(results), "--n-boot", "50")
    assert proc.returncode == 0, proc.stderr
    fit = json.loads((tmp_path / "scaling_fit.json").read_text())
    assert fit["families"]["gaussian"]["n_diverged_runs"] == 3 and fit["unfinished_rows"] == []


def test_a_file_cut_mid_row_is_refused_naming_the_row(tmp_path):
    """Today the short last row's missing fields read as NaN (a diverged cell), no warning."""
    results = _write(tmp_path, surface())
    text = results.read_text()
    results.write_text(text[: text.rstrip("\n").rindex("\n") + 12])  # 12 chars of the last row
    _refused(_cli("--results", str(results), "--n-boot", "10"), tmp_path, "line 148", "fields")


def test_conflicting_repeats_of_a_cell_are_refused_naming_both_lines(tmp_path):
    """Today two losses for one cell end in a matplotlib traceback after partial outputs."""
    df = surface()
    df = pd.concat([df, df.iloc[[20]].assign(final_val_loss=9.9)], ignore_index=True)
    results = _write(tmp_path, df)
    _refused(_cli("--results", str(results), "--n-boot", "10"), tmp_path, "line 22 and line 149")


def test_an_exact_repeat_is_counted_once_with_a_warning(tmp_path):
    clean = analyze(load_results(_write(tmp_path, surface())), n_boot=50)
    df = pd.concat([surface(), surface().iloc[[20]]], ignore_index=True)
    with pytest.warns(UserWarning, match=r"1 row\(s\) repeat .*line 149"):
        loaded = load_results(_write(tmp_path, df))
    assert len(loaded) == len(surface())
    assert analyze(loaded, n_boot=50)["beta"] == pytest.approx(clean["beta"])


@pytest.mark.parametrize("design", ["one_lr", "two_lrs", "one_batch_with_an_optimum"])
def test_a_design_without_a_slope_is_refused(tmp_path, design):
    """Today all rows at one lr print 'beta 0.000, CI [0.000, 0.000]'."""
    df = surface()
    if design == "one_lr":
        df = df[df["lr"] == LRS[3]]
    elif design == "two_lrs":
        df = df[df["lr"].isin(LRS[2:4])]
    else:  # every batch size but 8 diverged at every lr
        df.loc[df["batch_size"] != 8, "diverged"] = True
    results = _write(tmp_path, df)
    words = "batch sizes have a stable lr" if design.startswith("one_batch") else "learning rates"
    _refused(_cli("--results", str(results), "--n-boot", "10"), tmp_path, words)


def test_rows_that_did_not_finish_are_left_out_not_taken_for_diverged(tmp_path):
    """A failed or killed job's row (no loss) is a missing cell: today it counts as diverged."""
    df = surface()
    df["status"] = "finished"
    df.loc[[3, 40], ["status", "final_val_loss"]] = ["failed", np.nan]
    df.loc[77, ["status", "final_val_loss"]] = ["killed", np.nan]
    results = _write(tmp_path, df)
    proc = _cli("--results", str(results), "--n-boot", "50")
    assert proc.returncode == 1, proc.stderr
    assert "3 row(s) did not finish (failed 2, killed 1; line 5, 42, 79)" in proc.stdout
    fit = json.loads((tmp_path / "scaling_fit.json").read_text())
    assert fit["families"]["gaussian"]["n_diverged_runs"] == 0
    assert [r["line"] for r in fit["unfinished_rows"]] == [5, 42, 79]
    assert abs(fit["beta"] - 0.6) <= 0.05


def test_a_full_disk_names_the_file_and_leaves_no_output(tmp_path):
    """A write() that fails (here: a file-size limit, as a full disk does) names the file it
    hit; the outputs are written all or none, so no new scaling_fit.json is left beside no
    plots."""
    results = _write(tmp_path, surface())

    def limit() -> None:  # the first PNG (~70 kB) passes no more than 30 kB
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    proc = subprocess.run(
        [sys.executable, "analysis/scaling_analysis.py", "--results", str(results), "--n-boot",
         "10"], cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=limit,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: File too large: {tmp_path / 'lr_opt_vs_batch.png'}"], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_empty_cells_are_missing_values_not_text(tmp_path):
    """An empty optimizer cell is no second optimizer; a row without a noise family in a file
    of named families is refused (its family cannot be guessed), and a folder is no file."""
    df = surface().astype({"optimizer": object, "noise": object})
    df.loc[3, "optimizer"] = None
    results = _write(tmp_path, df)
    assert len(load_results(results)) == len(df)
    df.loc[7, "noise"] = " "
    results = _write(tmp_path, df)
    _refused(_cli("--results", str(results), "--n-boot", "10"), tmp_path, "line 9", "noise")
    with pytest.raises(UserError, match="is a folder"):
        load_results(tmp_path)

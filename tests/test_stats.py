"""training/stats.py against hand computation."""

import math

import pytest

from compositional_muon.training.stats import first_crossing, mean_ci, paired_difference, t_cdf, t_quantile


@pytest.mark.parametrize(
    "df,ref",  # two-sided 95% critical values from printed t tables
    [(1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (4, 2.7764451), (9, 2.2621572), (30, 2.0422725)],
)
def test_t_quantile_matches_tables(df, ref):
    assert t_quantile(0.975, df) == pytest.approx(ref, abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-ref, abs=1e-6)


def test_t_cdf_closed_forms():
    # df=1 is Cauchy: F(t) = 1/2 + atan(t)/pi; df=2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_paired_difference_by_hand():
    a = {0: 1.0, 1: 2.0, 2: 4.0, 7: 9.0}  # seed 7 has no partner: left out
    b = {0: 0.5, 1: 1.0, 2: 1.5}
    d = paired_difference(a, b)
    # d = 0.5, 1.0, 2.5; mean 4/3; deviations -5/6, -1/3, 7/6; sum of squares 13/6; var 13/12
    assert d.n == 3 and d.values == (0.5, 1.0, 2.5)
    assert d.mean == pytest.approx(4 / 3, abs=1e-15)
    assert d.sd == pytest.approx(math.sqrt(13 / 12), abs=1e-15)
    assert d.se == pytest.approx(math.sqrt(13 / 12) / math.sqrt(3), abs=1e-15)
    half = 4.302652729749 * math.sqrt(13 / 36)  # t_{0.975,2} * se
    assert d.lo == pytest.approx(4 / 3 - half, abs=1e-9) and d.hi == pytest.approx(4 / 3 + half, abs=1e-9)
    assert not d.excludes_zero()  # -1.2522 < 0 < 3.9189
    assert d.text() == "+1.3333 [-1.2522, +3.9189]"


def test_interval_excluding_zero_and_one_seed():
    d = mean_ci([-0.05, -0.04, -0.06])
    assert d.excludes_zero() and d.hi < 0
    one = mean_ci([0.25])
    assert one.n == 1 and math.isnan(one.se) and not one.excludes_zero()
    assert one.text() == "+0.2500 (1 seed)"
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({0: 1.0}, {1: 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([1.0, float("inf")])


def test_first_crossing_interpolates():
    xs, losses = [10, 20, 30], [3.0, 2.0, 1.0]
    assert first_crossing(xs, losses, 1.5) == pytest.approx(25.0)
    assert first_crossing(xs, losses, 2.0) == pytest.approx(20.0)
    assert first_crossing(xs, losses, 3.5) == 10.0  # already below at the first evaluation
    assert first_crossing(xs, losses, 0.5) is None
    assert first_crossing([1.0, 3.0], [5.0, 1.0], 4.0) == pytest.approx(1.5)  # times work the same way
    with pytest.raises(ValueError):
        first_crossing([1, 2], [1.0], 0.5)

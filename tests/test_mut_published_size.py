"""common.privacy.published_size: the R10 grid, the declared size and its warnings, checked
against hand-computed values and exact texts (kills the mutants tests/test_published_size.py
leaves alive)."""

from __future__ import annotations

import pytest

from common.privacy.published_size import MAX_PUBLISHED, bucket, declared_size, size_warning


def test_bucket_walks_the_whole_grid_over_three_decades():
    # Every grid value of 10..8000, hand-listed: 1, 1.25, 1.6, 2, 2.5, 3.15, 4, 5, 6.3, 8 × 10^k,
    # rounded up to integers (12.5 → 13, 31.5 → 32).
    grid = [10, 13, 16, 20, 25, 32, 40, 50, 63, 80,
            100, 125, 160, 200, 250, 315, 400, 500, 630, 800,
            1000, 1250, 1600, 2000, 2500, 3150, 4000, 5000, 6300, 8000]
    assert [bucket(g) for g in grid] == grid
    assert [bucket(g + 1) for g in grid[:-1]] == grid[1:]
    assert bucket(8001) == 10000


def test_bucket_of_nothing_or_a_fraction_is_the_first_grid_value():
    assert bucket(0) == 10 and bucket(-5) == 10 and bucket(1) == 10 and bucket(2) == 10
    assert bucket(9) == 10 and bucket(12) == 13 and bucket(31) == 32 and bucket(32) == 32 and bucket(33) == 40
    assert bucket(12.9) == 13  # int(12.9) = 12: still the grid value 13
    assert bucket(10**9) == 10**9


def test_declared_size_reads_both_settings_and_names_where():
    assert declared_size({}, {"published-size": 800}) == (800, "node config 'published-size'")
    assert declared_size({"published_size": "640"}, {}) == (640, "store.json 'published_size'")
    assert declared_size({"published_size": 500.0}, {"published-size": ""}) == (500, "store.json 'published_size'")
    assert declared_size({"published_size": 500}, {"published-size": None}) == (500, "store.json 'published_size'")
    assert declared_size({"published_size": ""}, {}) == (None, "")
    # the other file's key is not read
    assert declared_size({"published-size": 5}, {"published_size": 6}) == (None, "")
    assert declared_size({}, {"published-size": 1}) == (1, "node config 'published-size'")
    assert declared_size({}, {"published-size": MAX_PUBLISHED}) == (MAX_PUBLISHED, "node config 'published-size'")


@pytest.mark.parametrize("bad", [0, MAX_PUBLISHED + 1, 12.5, float("nan"), float("inf"), -1])
def test_declared_size_out_of_range_has_the_exact_message(bad):
    with pytest.raises(ValueError) as err:
        declared_size({}, {"published-size": bad})
    assert str(err.value) == (f"node config 'published-size' must be a whole number of members in "
                              f"1..{MAX_PUBLISHED}, got {bad!r}")


@pytest.mark.parametrize("bad", ["many", [3]])
def test_declared_size_not_a_number_has_the_exact_message(bad):
    with pytest.raises(ValueError) as err:
        declared_size({"published_size": bad}, {})
    assert str(err.value) == f"store.json 'published_size' must be a whole number of members, got {bad!r}"


def test_size_warning_texts_and_boundaries():
    assert size_warning(400, 400) is None
    assert size_warning(100, 400) is None  # exactly a quarter: no warning
    assert size_warning(401, 400) == (
        "the store has 401 training members, more than its published size 400: each step samples "
        "about 1.00× the planned batch, so updates are larger than planned (privacy is unaffected); "
        "raise published_size")
    assert size_warning(600, 400).startswith("the store has 600 training members, more than its published "
                                             "size 400: each step samples about 1.50× the planned batch")
    assert size_warning(99, 400) == (
        "the store has 99 training members, under a quarter of its published size 400: each step "
        "carries about 25% of the signal the noise was planned for (privacy is unaffected); lower "
        "published_size")
    assert "about 10% of the signal" in size_warning(40, 400)
    assert "about 0% of the signal" in size_warning(0, 400)

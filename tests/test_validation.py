"""The shared setting checks: TypeError for a wrong type, ValueError for a wrong value, each message
naming the setting and what is allowed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avalanche_dkvb.validation import (check_divides, check_non_negative_float, check_non_negative_int,
                                       check_positive_float, check_seeds)


@pytest.mark.parametrize("value", [0, -1e-3, math.nan, math.inf, -math.inf])
def test_positive_float_refuses_zero_negative_and_non_finite(value):
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got"):
        check_positive_float("lr", value)


@pytest.mark.parametrize("value", [-1, math.nan, math.inf])
def test_non_negative_float_refuses_negative_and_non_finite(value):
    with pytest.raises(ValueError, match=r"ewc_lambda must be a finite number >= 0, got"):
        check_non_negative_float("ewc_lambda", value)


@pytest.mark.parametrize("check", [check_positive_float, check_non_negative_float])
@pytest.mark.parametrize("value", ["1", None, True])
def test_float_checks_refuse_non_numbers_with_type_error(check, value):
    with pytest.raises(TypeError, match=r"x must be a finite number .* of type"):
        check("x", value)


def test_float_checks_accept_valid_numbers():
    check_positive_float("lr", 1e-3)
    check_positive_float("lr", np.float32(0.3))
    check_non_negative_float("alpha", 0)
    check_non_negative_float("alpha", 2.5)


def test_non_negative_int():
    check_non_negative_int("seed", 0)
    check_non_negative_int("seed", np.int64(3))
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer, got -1\."):
        check_non_negative_int("seed", -1)
    with pytest.raises(TypeError, match=r"seed must be a non-negative integer, got 1\.5 of type float"):
        check_non_negative_int("seed", 1.5)


@pytest.mark.parametrize("seeds, error", [([], ValueError), ([-1], ValueError), ([0, -2], ValueError),
                                          ([0.5], TypeError), ("0", TypeError), (None, TypeError),
                                          ([True], TypeError)])
def test_seeds_must_be_a_non_empty_list_of_non_negative_ints(seeds, error):
    with pytest.raises(error, match=r"seeds must be a non-empty list of non-negative integers, got"):
        check_seeds("seeds", seeds)


def test_seeds_refuse_repeats_and_return_a_list():
    with pytest.raises(ValueError, match=r"seeds must not repeat a seed, got \[1, 0, 1\] \(repeated: \[1\]\)"):
        check_seeds("seeds", [1, 0, 1])
    assert check_seeds("seeds", (2, 0)) == [2, 0]


def test_divides_lists_the_allowed_values():
    check_divides("experiences", 5, 10, "the number of classes")
    with pytest.raises(ValueError, match=r"experiences must divide the number of classes \(10\): "
                                         r"one of \[1, 2, 5, 10\], got 3\."):
        check_divides("experiences", 3, 10, "the number of classes")
    with pytest.raises(ValueError, match=r"experiences must be a positive integer, got 0\."):
        check_divides("experiences", 0, 10, "the number of classes")

"""Exit selection (serving.policy): pure functions, tested directly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serving.errors import ImpossibleBudget, InvalidParameters
from serving.policy import (
    CostTable,
    PolicyParams,
    gflops_spent,
    is_confident,
    parse_policy_spec,
    plan_request,
    softmax,
    top_k,
)

COSTS = CostTable(gflops=(0.1, 0.3, 0.6), stage_gflops=(0.1, 0.25, 0.35))  # cascade: 0.1, 0.35, 0.7
LATENCY = (1.0, 2.0, 5.0)
CASCADE_LATENCY = (1.0, 2.5, 6.0)


def plan(**kw):
    return plan_request(PolicyParams(**kw), COSTS, LATENCY, CASCADE_LATENCY)


@pytest.mark.parametrize(
    "budget, expected",
    [(0.1, 1), (0.29, 1), (0.3, 2), (0.59999, 2), (0.6, 3), (100.0, 3)],
)
def test_budget_gflops_picks_deepest_exit_within_budget(budget, expected):
    p = plan(budget_gflops=budget)
    assert (p.mode, p.exit, p.policy) == ("single", expected, "budget_gflops")


def test_budget_equal_to_a_cost_after_json_round_trip_is_accepted():
    costs = CostTable(gflops=(0.1 + 0.2, 0.9), stage_gflops=(0.3, 0.6))
    assert plan_request(PolicyParams(budget_gflops=float(repr(0.30000000000000004))), costs).exit == 1


def test_budget_below_cheapest_exit_names_the_cheapest_cost():
    with pytest.raises(ImpossibleBudget) as info:
        plan(budget_gflops=0.05)
    err = info.value
    assert err.status_code == 422
    assert err.body()["cheapest_gflops"] == 0.1
    assert "0.1" in err.detail and "exit 1" in err.detail


def test_non_monotone_costs_pick_the_deepest_exit_within_budget():
    # As in the paper's ResNet-50: exit 3's head makes it dearer than the main output.
    costs = CostTable(gflops=(0.5, 1.0, 2.2, 2.0), stage_gflops=(0.5, 0.6, 1.3, 0.9))
    assert plan_request(PolicyParams(budget_gflops=2.1), costs).exit == 4
    assert plan_request(PolicyParams(budget_gflops=2.0), costs).exit == 4
    assert plan_request(PolicyParams(budget_gflops=1.99), costs).exit == 2
    with pytest.raises(ImpossibleBudget) as info:
        plan_request(PolicyParams(budget_gflops=0.4), costs)
    assert info.value.body()["cheapest_exit"] == 1


def test_impossible_cascade_budget_names_the_first_stage():
    with pytest.raises(ImpossibleBudget, match="first stage of a cascade") as info:
        plan(confidence=0.9, budget_gflops=0.05)
    assert info.value.body()["cheapest_gflops"] == 0.1


@pytest.mark.parametrize("budget, expected", [(1.0, 1), (2.0, 2), (4.9, 2), (5.0, 3)])
def test_budget_ms_uses_latency_estimates(budget, expected):
    p = plan(budget_ms=budget)
    assert (p.exit, p.policy, p.budget_ms) == (expected, "budget_ms", budget)


def test_budget_ms_below_fastest_estimate_is_422_naming_it():
    with pytest.raises(ImpossibleBudget) as info:
        plan(budget_ms=0.5)
    body = info.value.body()
    assert body["fastest_ms"] == 1.0 and body["fastest_exit"] == 1 and body["cheapest_gflops"] == 0.1


def test_budget_ms_tolerates_non_monotonic_estimates():
    # Exit 2 measured faster than exit 1 right now (noise, caching): still a valid pick.
    p = plan_request(PolicyParams(budget_ms=1.5), COSTS, (2.0, 1.0, 5.0), CASCADE_LATENCY)
    assert p.exit == 2


def test_both_budgets_take_the_stricter():
    assert plan(budget_gflops=0.6, budget_ms=2.0).exit == 2
    assert plan(budget_gflops=0.3, budget_ms=100).exit == 2
    assert plan(budget_gflops=0.6, budget_ms=100).policy == "budget"


def test_confidence_plans_a_cascade_to_the_main_output():
    p = plan(confidence=0.8)
    assert (p.mode, p.exit, p.threshold, p.policy) == ("cascade", 3, 0.8, "confidence")


@pytest.mark.parametrize("budget, deepest", [(0.1, 1), (0.34, 1), (0.35, 2), (0.69, 2), (0.7, 3)])
def test_cascade_budget_bounds_gflops_actually_spent(budget, deepest):
    p = plan(confidence=0.9, budget_gflops=budget)
    assert (p.mode, p.exit) == ("cascade", deepest)
    # The deepest possible run costs no more than the budget.
    assert gflops_spent(COSTS, "cascade", list(range(1, deepest + 1))) <= budget + 1e-12


def test_cascade_budget_ms_uses_cumulative_estimates():
    assert plan(confidence=0.9, budget_ms=2.6).exit == 2
    assert plan(confidence=0.9, budget_ms=5.5).exit == 2


def test_exit_selects_that_exit():
    assert (plan(exit=2).mode, plan(exit=2).exit) == ("single", 2)
    assert plan(exit="last").exit == 3


@pytest.mark.parametrize("number", [0, 4, -1])
def test_exit_out_of_range_is_422(number):
    with pytest.raises(InvalidParameters, match="1..3"):
        plan(exit=number)


@pytest.mark.parametrize("extra", [{"budget_gflops": 1.0}, {"confidence": 0.5}, {"budget_ms": 3.0}])
def test_exit_with_budget_or_confidence_is_contradictory(extra):
    with pytest.raises(InvalidParameters, match="cannot be combined"):
        plan(exit=1, **extra)


@pytest.mark.parametrize(
    "kw", [{"confidence": 1.5}, {"confidence": -0.1}, {"confidence": math.nan}, {"budget_gflops": 0.0},
           {"budget_gflops": -1.0}, {"budget_gflops": math.inf}, {"budget_ms": math.nan}]
)
def test_out_of_range_values_are_422(kw):
    with pytest.raises(InvalidParameters):
        plan(**kw)


def test_confidence_bounds_are_inclusive():
    assert plan(confidence=0.0).threshold == 0.0
    assert plan(confidence=1.0).threshold == 1.0


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("exit:last", PolicyParams(exit="last")),
        ("exit:2", PolicyParams(exit=2)),
        ("confidence:0.9", PolicyParams(confidence=0.9)),
        (" confidence=0.8 , budget_gflops:1.5 ", PolicyParams(confidence=0.8, budget_gflops=1.5)),
        ("budget_ms:20", PolicyParams(budget_ms=20.0)),
    ],
)
def test_parse_policy_spec(spec, expected):
    assert parse_policy_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "last", "exit:first", "speed:3", "confidence:high", "exit:1,exit:2",
                                  "budget_ms:inf"])
def test_parse_policy_spec_rejects_with_a_readable_message(spec):
    with pytest.raises(ValueError) as info:
        parse_policy_spec(spec)
    assert str(info.value)


def test_softmax_is_stable_and_normalised():
    p = softmax(np.array([1000.0, 1000.0, -1000.0], dtype=np.float32))
    assert np.allclose(p, [0.5, 0.5, 0.0]) and math.isclose(p.sum(), 1.0)


def test_top_k_orders_by_probability_with_deterministic_ties():
    probs = np.array([0.1, 0.4, 0.1, 0.4])
    assert top_k(probs, 3) == [(1, 0.4), (3, 0.4), (0, 0.1)]
    assert len(top_k(probs, 99)) == 4  # capped at the number of classes


def test_is_confident_uses_top_probability():
    assert is_confident(np.array([0.9, 0.1]), 0.9)
    assert not is_confident(np.array([0.6, 0.4]), 0.61)


def test_gflops_spent():
    assert gflops_spent(COSTS, "single", [2]) == 0.3
    assert math.isclose(gflops_spent(COSTS, "cascade", [1, 2]), 0.35)
    assert math.isclose(gflops_spent(COSTS, "cascade", [1, 2, 3]), sum(COSTS.stage_gflops))


def test_contradictory_parameters_name_the_cheapest_cost():
    with pytest.raises(InvalidParameters) as info:
        plan(exit=2, budget_gflops=0.5)
    body = info.value.body()  # what the client receives with the 422
    assert info.value.status_code == 422 and body["error"] == "invalid_parameters"
    assert body["cheapest_gflops"] == pytest.approx(0.1) and body["cheapest_exit"] == 1

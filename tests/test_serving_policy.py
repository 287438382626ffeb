"""Exit selection (serving.policy): pure functions, tested directly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serving import cascade
from serving.errors import ImpossibleBudget, InvalidParameters
from serving.manifest import Thresholds
from serving.memo import Memo
from serving.policy import (
    CostTable,
    PolicyParams,
    calibrated_policies,
    effective_params,
    params_from_request,
    parse_policy_spec,
    plan_request,
)

POLICIES = {"cheap": (0.5, 0.6), "careful": (0.95, 0.9)}
COSTS = CostTable(gflops=(0.1, 0.3, 0.6), stage_gflops=(0.1, 0.25, 0.35), policies=POLICIES)  # cascade: .1 .35 .7
IDLE_CASCADE_MS = (1.0, 2.5, 6.0)
NEVER2 = (cascade.NEVER, cascade.NEVER)


def plan(**kw):
    if isinstance(kw.get("confidence"), (int, float)):
        kw["confidence"] = (kw["confidence"],)
    return plan_request(PolicyParams(**kw), COSTS, IDLE_CASCADE_MS)


@pytest.mark.parametrize(
    "budget, expected",
    # exact: a budget one float below a cost does not buy that exit
    [(0.1, 1), (0.29, 1), (math.nextafter(0.3, 0), 1), (0.3, 2), (0.59999, 2), (0.6, 3), (100.0, 3)],
)
def test_budget_gflops_picks_deepest_exit_within_budget(budget, expected):
    p = plan(budget_gflops=budget)
    assert (p.mode, p.exit) == ("single", expected)


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


@pytest.mark.parametrize("budget, expected", [(1.0, 1), (2.49, 1), (2.5, 2), (5.9, 2), (6.0, 3), (1e6, 3)])
def test_deadline_plans_a_cascade_up_to_what_an_idle_server_can_finish(budget, expected):
    p = plan(budget_ms=budget)
    assert (p.mode, p.exit, p.thresholds, p.budget_ms) == ("cascade", expected, NEVER2, budget)


def test_deadline_below_exit_1_idle_service_time_is_422_naming_it():
    with pytest.raises(ImpossibleBudget) as info:
        plan(budget_ms=0.5)
    body = info.value.body()
    assert body["idle_exit1_ms"] == 1.0 and body["cheapest_exit"] == 1 and body["cheapest_gflops"] == 0.1
    assert "idle" in info.value.detail


def test_both_budgets_take_the_stricter():
    assert plan(budget_gflops=0.7, budget_ms=2.5).exit == 2
    assert plan(budget_gflops=0.35, budget_ms=100).exit == 2
    assert PolicyParams(budget_gflops=0.6, budget_ms=100).name == "budget"


def test_a_deadline_beside_a_gflops_budget_keeps_the_exit_the_budget_buys():
    """A FLOP budget means the deepest exit whose full path fits (DESIGN §4), with or without a
    deadline (an operator's EED_DEFAULT_BUDGET_MS adds one to every request): answered in one call
    it is exit 3 (0.6 GFLOPs) for 0.65; only the stages, which spend the trunk once plus every head
    on the way (0.7 to exit 3), stop at exit 2. The deadline used to cap both at exit 2."""
    p = plan(budget_gflops=0.65, budget_ms=100)
    assert (p.mode, p.exit, p.stages_to, p.thresholds) == ("cascade", 3, 2, NEVER2)
    assert plan(budget_gflops=0.65).exit == 3  # the same exit without the deadline
    assert (
        plan(budget_gflops=0.7, budget_ms=100).stages_to == 3
        and plan(budget_gflops=0.7, budget_ms=100).stage_exit is None
    )
    # The same for time: exit 3's full path idles at 4 ms, the stages to it at 6 ms.
    timed = plan_request(PolicyParams(budget_ms=5.0), COSTS, IDLE_CASCADE_MS, (1.0, 2.0, 4.0))
    assert (timed.exit, timed.stages_to) == (3, 2)
    # A confidence cascade runs stages (or their fused graph) only: the cascade's costs cap it.
    assert plan(confidence=0.9, budget_gflops=0.65, budget_ms=100).exit == 2


def test_confidence_plans_a_cascade_to_the_main_output():
    p = plan(confidence=0.8)
    assert (p.mode, p.exit, p.thresholds, p.budget_ms) == ("cascade", 3, (0.8, 0.8), None)
    assert PolicyParams(confidence=(0.8,)).name == "confidence"


def test_per_exit_confidence_gives_one_threshold_per_early_exit():
    assert plan(confidence=(0.7, 0.4)).thresholds == (0.7, 0.4)
    with pytest.raises(InvalidParameters, match="2 early exits"):
        plan(confidence=(0.7, 0.4, 0.3))
    with pytest.raises(InvalidParameters, match="out of range"):
        plan(confidence=(0.7, 1.2))


def test_named_policy_runs_its_calibrated_thresholds():
    p = plan(policy="cheap")
    assert (p.mode, p.exit, p.thresholds) == ("cascade", 3, (0.5, 0.6))
    assert plan(policy="careful", budget_ms=2.5).exit == 2
    assert PolicyParams(policy="cheap").name == "policy:cheap"


def test_unknown_or_contradictory_policy_is_422_listing_the_names():
    with pytest.raises(InvalidParameters, match="careful, cheap") as info:
        plan(policy="fast")
    assert info.value.body()["accepted"] == ["careful", "cheap"]
    with pytest.raises(InvalidParameters, match="cannot be combined"):
        plan(policy="cheap", confidence=0.5)
    with pytest.raises(InvalidParameters, match="cannot be combined"):
        plan(policy="cheap", exit=2)


def test_calibrated_policies_come_from_the_manifest_thresholds_section():
    score = {"accuracy": 0.9, "mean_gflops": 0.2, "exit_fractions": [0.5, 0.3, 0.2]}
    section = Thresholds.model_validate(
        {
            "rule": cascade.RULE,
            "policies": {
                "a": {"target": {"mean_gflops": 0.2}, "thresholds": [0.5, 0.6], "family": "geometric", "val": score}
            },
            "not_calibrated": [{"name": "b", "target": {"accuracy": 0.99}, "reason": "not reached"}],
        }
    )
    assert calibrated_policies(section, 3) == {"a": (0.5, 0.6)}
    assert calibrated_policies(None, 3) == {}


@pytest.mark.parametrize("budget, deepest", [(0.1, 1), (0.34, 1), (0.35, 2), (0.69, 2), (0.7, 3)])
def test_cascade_budget_bounds_gflops_actually_spent(budget, deepest):
    p = plan(confidence=0.9, budget_gflops=budget)
    assert (p.mode, p.exit) == ("cascade", deepest)
    # The deepest possible run costs no more than the budget.
    assert COSTS.spent("cascade", list(range(1, deepest + 1))) <= budget + 1e-12


def test_exit_selects_that_exit():
    assert (plan(exit=2).mode, plan(exit=2).exit) == ("single", 2)
    assert plan(exit="last").exit == 3


@pytest.mark.parametrize("number", [0, 4, -1])
def test_exit_out_of_range_is_422(number):
    with pytest.raises(InvalidParameters, match="1..3"):
        plan(exit=number)


@pytest.mark.parametrize(
    "extra", [{"budget_gflops": 1.0}, {"confidence": 0.5}, {"budget_ms": 3.0}, {"policy": "cheap"}]
)
def test_exit_with_budget_or_confidence_is_contradictory(extra):
    with pytest.raises(InvalidParameters, match="cannot be combined"):
        plan(exit=1, **extra)


@pytest.mark.parametrize(
    "kw",
    [
        {"confidence": 1.5},
        {"confidence": -0.1},
        {"confidence": math.nan},
        {"budget_gflops": 0.0},
        {"budget_gflops": -1.0},
        {"budget_gflops": math.inf},
        {"budget_ms": math.nan},
    ],
)
def test_out_of_range_values_are_422(kw):
    with pytest.raises(InvalidParameters):
        plan(**kw)


def test_confidence_bounds_are_inclusive():
    assert plan(confidence=0.0).thresholds == (0.0, 0.0)
    assert plan(confidence=1.0).thresholds == (1.0, 1.0)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("exit:last", PolicyParams(exit="last")),
        ("exit:2", PolicyParams(exit=2)),
        ("confidence:0.9", PolicyParams(confidence=(0.9,))),
        (" confidence=0.8 , budget_gflops:1.5 ", PolicyParams(confidence=(0.8,), budget_gflops=1.5)),
        ("budget_ms:20", PolicyParams(budget_ms=20.0)),
        ("policy:budget_0.5x_main", PolicyParams(policy="budget_0.5x_main")),
        # The query string's vocabulary (it refused both before, and stopped the server at start):
        ("exit:LAST", PolicyParams(exit="last")),
        ("confidence:0.65,0.43,0.33,budget_ms:20", PolicyParams(confidence=(0.65, 0.43, 0.33), budget_ms=20.0)),
    ],
)
def test_parse_policy_spec(spec, expected):
    assert parse_policy_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "empty policy"),
        ("last", "expected comma-separated key:value"),
        ("exit:first", "integer 1..k or 'last'"),
        ("speed:3", "keys exit, budget_gflops"),
        ("confidence:high", "not a number or a comma-separated list"),
        ("confidence:1e-1", "not a number or a comma-separated list"),  # as ?confidence=1e-1 is
        ("exit:1,exit:2", "twice"),
        ("budget_ms:inf", "finite number"),
        ("policy:", "has no value"),
        ("budget_ms:20,0.5", "expected comma-separated key:value"),  # only confidence takes a list
    ],
)
def test_parse_policy_spec_rejects_with_a_readable_message(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_policy_spec(spec)


def test_params_from_request_parses_strings_and_numbers():
    assert params_from_request({"confidence": "0.65, 0.43", "exit": None, "budget_ms": "20"}) == PolicyParams(
        confidence=(0.65, 0.43), budget_ms=20.0
    )
    assert params_from_request({"exit": "LAST", "policy": "cheap"}) == PolicyParams(exit="last", policy="cheap")
    assert params_from_request({"budget_gflops": 1.5}) == PolicyParams(budget_gflops=1.5)
    for bad, fragment in [
        ({"confidence": "0.5,x"}, "comma-separated"),
        ({"budget_ms": "soon"}, "not a number"),
        ({"exit": "first"}, "not an exit number"),
        ({"budget_gflops": "nan"}, "finite"),
    ]:
        with pytest.raises(InvalidParameters, match=fragment):
            params_from_request(bad)


def test_server_deadline_applies_to_requests_that_name_no_deadline_and_no_exit():
    default = PolicyParams(exit="last")
    assert effective_params(PolicyParams(), default, None) == default
    assert effective_params(PolicyParams(), default, 50.0) == PolicyParams(budget_ms=50.0)
    assert effective_params(PolicyParams(policy="cheap"), default, 50.0) == PolicyParams(policy="cheap", budget_ms=50.0)
    assert effective_params(PolicyParams(budget_ms=5.0), default, 50.0) == PolicyParams(budget_ms=5.0)
    assert effective_params(PolicyParams(exit=2), default, 50.0) == PolicyParams(exit=2)  # exactly that exit
    conf = PolicyParams(confidence=(0.9,))
    assert effective_params(PolicyParams(), conf, 50.0) == PolicyParams(confidence=(0.9,), budget_ms=50.0)


def test_stopping_rule_uses_top_probability_and_the_last_exit_always_stops():
    t = np.array([0.9, 0.61])
    assert cascade.stops_at(float(cascade.top_probability(np.log([0.95, 0.05]))), t, 1)
    assert cascade.stops_at(0.9, t, 1)  # >= threshold stops
    assert not cascade.stops_at(0.6, t, 2)
    assert cascade.stops_at(0.01, t, 3)
    assert math.isclose(float(cascade.top_probability(np.log([0.6, 0.4]))), 0.6)


def test_gflops_spent():
    assert COSTS.spent("single", [2]) == 0.3
    assert math.isclose(COSTS.spent("cascade", [1, 2]), 0.35)
    assert math.isclose(COSTS.spent("cascade", [1, 2, 3]), sum(COSTS.stage_gflops))
    assert COSTS.spent("cascade", []) == 0.0


def test_contradictory_parameters_name_the_cheapest_cost():
    with pytest.raises(InvalidParameters) as info:
        plan(exit=2, budget_gflops=0.5)
    body = info.value.body()  # what the client receives with the 422
    assert info.value.status_code == 422 and body["error"] == "invalid_parameters"
    assert body["cheapest_gflops"] == pytest.approx(0.1) and body["cheapest_exit"] == 1


def test_the_request_memo_stays_bounded_and_keeps_what_is_used_over_one_offs():
    memo: Memo[bytes, int] = Memo(capacity=3)
    for i in range(3):
        memo.put(f"exit={i}".encode(), i)
    assert memo.get(b"exit=0") == 0  # a common query, used
    # A client computing its deadline per request: a new query string every time.
    for i in range(2):
        memo.put(f"budget_ms={i}.5".encode(), i)
    assert len(memo) == 3 and memo.get(b"budget_ms=0.5") is None  # full: not stored, nothing forgotten
    memo.put(b"budget_ms=9.5", 9)  # the third refusal sweeps out what went unused since the last sweep
    assert len(memo) == 2 and memo.get(b"exit=0") == 0 and memo.get(b"exit=1") is None
    assert memo.get(b"budget_ms=9.5") == 9
    memo.put(b"exit=1", 1)  # a common query arriving late is remembered now
    assert memo.get(b"exit=1") == 1 and len(memo) == 3
    memo.put(b"exit=0", 99)  # an existing entry is kept (the same text gives the same result)
    assert memo.get(b"exit=0") == 0
    for i in range(1000):  # a flood of one-offs: the memo never holds more than its capacity
        memo.put(f"budget_ms={i}".encode(), i)
        assert len(memo) <= 3
        memo.get(b"exit=0")  # the common query keeps being used between sweeps, and stays
    assert memo.get(b"exit=0") == 0

"""A chapter's unlearning runs as plan lines (``uoe_nb.budget``): the counts match the schedule
``uoe_nb.unlearn.unlearn`` evaluates at, and the full-mode rehearsal's fakes count alike."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from uoe_nb import scopes
from uoe_nb.budget import evaluations_at, plan_runs, scope_kind, takes_retain_batch
from uoe_nb.evaluation import Evaluator
from uoe_nb.plan import Plan
from uoe_nb.unlearn import UnlearnConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_mode_fakes  # noqa: E402

EVALUATOR = Evaluator(lambda m: 0.5, lambda m: 0.5, forget_questions=500, utility_questions=1140)


@pytest.mark.parametrize(("steps", "every"), [(400, 25), (400, 40), (4, 4), (10, 3), (1, 10)])
def test_schedule_agrees_with_the_fakes(steps, every):
    assert evaluations_at(steps, every) == full_mode_fakes.evaluations_at(steps, every)


def test_schedule_refuses_non_positive_budgets():
    with pytest.raises(ValueError, match="positive"):
        evaluations_at(0, 10)


def test_target_scores_utility_at_step_zero_and_at_the_end():
    plan = Plan("test")
    config = UnlearnConfig(steps=400, eval_every=25, stop_forget_accuracy=0.3, utility_eval="target")
    line = plan_runs(plan, "ga+uoe", config, EVALUATOR, runs=2)
    assert line.runs == 2 and line.optimizer_steps == 800
    assert line.evaluations == 2 * (17 + 2)
    assert line.questions == 2 * (17 * 500 + 2 * 1140)
    assert line.training_tokens == 2 * 400 * 4 * 128  # batch 4 x 128 tokens (the defaults)
    assert line.kind == "uoe"


def test_always_scores_both_parts_at_every_evaluation():
    plan = Plan("test")
    config = UnlearnConfig(method="graddiff", scope="full", steps=40, eval_every=10)
    line = plan_runs(plan, "graddiff", config, EVALUATOR)
    assert line.questions == 5 * (500 + 1140)
    assert line.training_tokens == 40 * 4 * 128 * 2  # the retain batch doubles the tokens
    assert line.kind == "full"


def test_a_served_first_evaluation_is_not_counted():
    plan = Plan("test")
    config = UnlearnConfig(steps=400, eval_every=40, stop_forget_accuracy=0.3, utility_eval="target")
    line = plan_runs(plan, "cell", config, EVALUATOR, first_evaluation=False)
    assert line.questions == 10 * 500 + 1 * 1140


def test_no_evaluator_no_questions():
    line = plan_runs(Plan("test"), "run", UnlearnConfig(steps=10), None)
    assert (line.evaluations, line.questions) == (0, 0)


def test_an_evaluator_without_counts_is_refused():
    with pytest.raises(TypeError, match="Evaluator"):
        plan_runs(Plan("test"), "run", UnlearnConfig(steps=10), lambda m: {})


def test_scope_kinds_and_retain_batches():
    assert (
        scope_kind("uoe") == scope_kind(scopes.k_experts(1, 3)) == scope_kind(scopes.random_expert()) == "uoe"
    )
    for scope in (
        "full",
        "routers",
        "experts",
        scopes.per_layer_experts("all"),
        scopes.esft(),
        scopes.lora(8),
    ):
        assert scope_kind(scope) == "full", scope
    with pytest.raises(TypeError, match="scope"):
        scope_kind(3)
    assert takes_retain_batch(UnlearnConfig(method="rmu"))
    assert takes_retain_batch(UnlearnConfig(method="npo"))
    assert not takes_retain_batch(UnlearnConfig(method="npo", retain_weight=0.0))
    assert not takes_retain_batch(UnlearnConfig(method="ga"))

"""A chapter's unlearning runs as lines of its plan (Chapters 2 and 4-8).

:class:`uoe_nb.plan.Plan` counts runs, steps and questions from plain numbers. A chapter has
them in an :class:`uoe_nb.unlearn.UnlearnConfig` and an evaluator instead, so
:func:`plan_runs` reads them from there: the steps, the batch, whether the method takes a
retain batch, the kind of step (one layer's experts, or a backward pass through the whole
model), and the evaluations :func:`uoe_nb.unlearn.unlearn` makes at that budget: forget
accuracy at step 0, every ``eval_every`` steps and at the last step; utility at each of
them, or with ``utility_eval="target"`` only at step 0 and at the end (the count of a run
that never reaches its target before the last step, its most expensive case).
"""

from __future__ import annotations

from typing import Any

from .plan import Plan, PlanLine

__all__ = ["evaluations_at", "plan_runs", "scope_kind", "takes_retain_batch"]

#: Scope kinds whose step trains one layer's experts (the plan's ``"uoe"`` rate); every other
#: kind runs the backward pass through the whole model (``"full"``).
ONE_LAYER_KINDS = ("uoe", "k_experts", "random_expert")


def evaluations_at(steps: int, eval_every: int) -> int:
    """Evaluations of a run of ``steps`` steps: step 0, every ``eval_every`` steps, the last step."""
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps and eval_every must be positive, got {steps} and {eval_every}")
    return 1 + steps // eval_every + (1 if steps % eval_every else 0)


def scope_kind(scope: Any) -> str:
    """``"uoe"`` for a scope that trains experts of one layer, ``"full"`` otherwise (a name or a Scope)."""
    kind = getattr(scope, "kind", None)
    if kind is None:
        if not isinstance(scope, str):
            raise TypeError(
                f"scope must be a scope name or a uoe_nb.scopes.Scope, got {type(scope).__name__}"
            )
        kind = scope.split("(")[0]
    return "uoe" if kind in ONE_LAYER_KINDS else "full"


def takes_retain_batch(config: Any) -> bool:
    """Whether each step also runs a retain batch (RMU; GradDiff, NPO, SimNPO with a retain weight)."""
    if config.method == "rmu":
        return True
    return config.method in ("graddiff", "npo", "simnpo") and config.retain_weight != 0


def plan_runs(
    plan: Plan,
    label: str,
    config: Any,
    evaluate: Any = None,
    *,
    runs: int = 1,
    first_evaluation: bool = True,
) -> PlanLine:
    """Add ``runs`` unlearning runs of ``config``, scored by ``evaluate``, to ``plan``.

    ``evaluate`` is an :class:`uoe_nb.evaluation.Evaluator` (its ``forget_questions`` and
    ``utility_questions`` are counted) or ``None`` (no evaluation). ``first_evaluation=False``
    when the step-0 score is already known and served without scoring (``baselines.run_grid``
    with ``before=``).
    """
    evals = forget_evals = utility_evals = 0
    f_questions = u_questions = 0
    if evaluate is not None:
        for key in ("forget_questions", "utility_questions"):
            if not isinstance(getattr(evaluate, key, None), int):
                raise TypeError(
                    f"evaluate has no {key}: pass a uoe_nb.evaluation.Evaluator (scale.load_benchmark(...)"
                    ".evaluate or evaluation.world_evaluator) so that its questions can be counted"
                )
        f_questions, u_questions = evaluate.forget_questions, evaluate.utility_questions
        evals = evaluations_at(config.steps, config.eval_every)
        forget_evals = evals
        utility_evals = min(2, evals) if config.utility_eval == "target" else evals
        if not first_evaluation:
            forget_evals, utility_evals = forget_evals - 1, utility_evals - 1
    return plan.train(
        label,
        runs=runs,
        steps=config.steps,
        batch_size=config.batch_size,
        max_length=config.max_length,
        scope=scope_kind(config.scope),
        retain=takes_retain_batch(config),
        forget_evals=forget_evals,
        forget_questions=f_questions if forget_evals else 0,
        utility_evals=utility_evals,
        utility_questions=u_questions if utility_evals else 0,
    )

"""Stand-ins for the hub, so that the chapters' full-mode branches can run on a CPU.

Full mode loads real checkpoints and the real benchmarks from the Hugging Face hub, which
this machine cannot reach. :func:`install` replaces exactly the three places that touch
the hub, and nothing else:

* ``uoe_nb.mode.load_model`` in full mode returns, in bf16 as on a GPU, a tiny model of the
  preset's own family (:func:`fake_load_model`): the trained zoo models for Qwen2Moe,
  DeepSeek-V2 and Mixtral, a seeded random-weight model of the real transformers-5 class for
  OLMoE (no shared experts, the default preset) and GraniteMoe, and the dense zoo model for a
  dense hub id (e.g. the pilot study's Phi-3.5);
* ``uoe_nb.data._load_rows`` serves each dataset (WMDP questions and corpora, wikitext,
  RWKU targets, passages and probes, MMLU) as rows of the same schema built from the tiny
  world, so the real loaders' filtering and checks run;
* ``uoe_nb.evaluation.lm_eval_tasks`` scores ``wmdp_*`` on the world's forget questions
  and ``mmlu`` on its utility questions through the same lm-eval path tiny mode uses.

It also counts the questions ``uoe_nb.attacks.measure_mc`` scores (each item without and with
the suffix) and those the attacks of ``uoe_nb.robustness`` score (relearning, quantization,
routing; Chapter 7), which a chapter's plan includes, and counts each relearning attack's
fine-tune as a run of the optimizer steps it requested.

It also builds lm-eval's task index (``lm_eval.tasks.TaskManager``, 10-15 s here) only when
something reads it, which the faked ``lm_eval_tasks`` never does, caps every unlearning
run and every relearning attack at ``max_steps`` steps and every GCG attack at two steps of
eight candidates (full-mode budgets are hundreds or thousands of steps). The point is to
execute every full-mode line of a chapter; its numbers mean nothing, so science asserts that
hold only for real budgets may fail and are reported separately by the test.

While it runs, :class:`Counter` records what the chapter asked for at its real budget: every
unlearning run with the optimizer steps it requested before the cap, and the evaluation
questions the real lm-eval tasks would have scored (:func:`real_questions`; a run's periodic
evaluations are counted at the schedule of its uncapped budget). With ``UOE_NB_FAKE_COUNTS``
set to a path, the counts are written there as JSON after every event;
:func:`compare_with_plan` checks them against the ``plan: ...`` line a chapter prints.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

DTYPE = torch.bfloat16  # what full mode loads on a GPU
FAMILY_ZOO = {"qwen2_moe": "tiny-qwen2moe", "deepseek_v2": "tiny-deepseek", "mixtral": "tiny-mixtral"}
# Families without a trained zoo model: a random-weight model of the real class at zoo size.
RANDOM_FAMILIES = {
    "olmoe": dict(experts=16, top_k=4, intermediate=64),  # OLMoE: 64 experts top-8, no shared expert
    "granitemoe": dict(experts=8, top_k=2, intermediate=64),  # Granite 3.0: 32 experts top-8
}
RANDOM_SEED = 0

# Questions in the real lm-eval tasks (WMDP's test split; MMLU's test split per subject).
WMDP_SIZES = {"wmdp_bio": 1273, "wmdp_chem": 408, "wmdp_cyber": 1987}
MMLU_TEST_SIZES = {
    "abstract_algebra": 100, "anatomy": 135, "astronomy": 152, "business_ethics": 100,
    "clinical_knowledge": 265, "college_biology": 144, "college_chemistry": 100,
    "college_computer_science": 100, "college_mathematics": 100, "college_medicine": 173,
    "college_physics": 102, "computer_security": 100, "conceptual_physics": 235, "econometrics": 114,
    "electrical_engineering": 145, "elementary_mathematics": 378, "formal_logic": 126, "global_facts": 100,
    "high_school_biology": 310, "high_school_chemistry": 203, "high_school_computer_science": 100,
    "high_school_european_history": 165, "high_school_geography": 198,
    "high_school_government_and_politics": 193, "high_school_macroeconomics": 390,
    "high_school_mathematics": 270, "high_school_microeconomics": 238, "high_school_physics": 151,
    "high_school_psychology": 545, "high_school_statistics": 216, "high_school_us_history": 204,
    "high_school_world_history": 237, "human_aging": 223, "human_sexuality": 131, "international_law": 121,
    "jurisprudence": 108, "logical_fallacies": 163, "machine_learning": 112, "management": 103,
    "marketing": 234, "medical_genetics": 100, "miscellaneous": 783, "moral_disputes": 346,
    "moral_scenarios": 895, "nutrition": 306, "philosophy": 311, "prehistory": 324,
    "professional_accounting": 282, "professional_law": 1534, "professional_medicine": 272,
    "professional_psychology": 612, "public_relations": 110, "security_studies": 245, "sociology": 201,
    "us_foreign_policy": 100, "virology": 166, "world_religions": 171,
}  # fmt: skip


def real_questions(task: str, limit: int | None) -> int:
    """Questions lm-eval's real ``task`` scores with ``limit`` (which caps every subtask).

    ``mmlu`` is a group of 57 subjects, so ``limit=200`` scores 9,183 questions (a subject
    with fewer than 200 gives all it has), not 57 x 200; ``wmdp`` is the group of the three
    WMDP tasks.
    """
    if task == "mmlu":
        sizes = list(MMLU_TEST_SIZES.values())
    elif task == "wmdp":
        sizes = list(WMDP_SIZES.values())
    elif task in WMDP_SIZES:
        sizes = [WMDP_SIZES[task]]
    elif task.startswith("mmlu_") and task[5:] in MMLU_TEST_SIZES:
        sizes = [MMLU_TEST_SIZES[task[5:]]]
    else:
        raise AssertionError(f"the chapters asked for an lm-eval task the fakes do not know: {task!r}")
    return sum(n if limit is None else min(n, limit) for n in sizes)


def evaluations_at(steps: int, eval_every: int) -> int:
    """Evaluations an unlearning run of ``steps`` makes: step 0, every ``eval_every``, the last step."""
    return 1 + steps // eval_every + (1 if steps % eval_every else 0)


# ---------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------


@functools.cache
def _zoo_tokenizer():
    """The tokenizer every zoo model shares (its vocabulary sizes the random-weight models)."""
    from transformers import AutoTokenizer

    from uoe_nb.zoo import zoo_dir

    return AutoTokenizer.from_pretrained(zoo_dir() / "tiny-qwen2moe")


@functools.cache
def _pristine(kind: str):
    """The cached original of ``kind`` (a zoo name or ``random:<family>``) in bf16, built once per process."""
    from uoe_nb.zoo import load_zoo_model

    if not kind.startswith("random:"):
        model, tokenizer = load_zoo_model(kind)
        return model.to(DTYPE).eval(), tokenizer
    from uoe_nb.families import random_model, tiny_config

    family = kind.split(":", 1)[1]
    tokenizer = _zoo_tokenizer()
    config = tiny_config(
        family, vocab_size=len(tokenizer), hidden=64, layers=4, heads=4, **RANDOM_FAMILIES[family]
    )
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return random_model(config, seed=RANDOM_SEED, dtype=DTYPE), tokenizer


def served_kind(name: str | None) -> str:
    """What :func:`fake_load_model` serves for a full-mode ``name`` (preset or hub id)."""
    from uoe_nb.mode import DEFAULT_FULL_MODEL, PRESETS

    preset = PRESETS.get(name or DEFAULT_FULL_MODEL)
    if preset is None:
        return "tiny-dense"  # a dense hub id
    if preset.family in FAMILY_ZOO:
        return FAMILY_ZOO[preset.family]
    if preset.family in RANDOM_FAMILIES:
        return "random:" + preset.family
    raise AssertionError(f"preset {preset.name!r} has family {preset.family!r}, which the fakes cannot serve")


def fake_load_model(name: str | None = None, *, dtype: torch.dtype | None = None):
    """A fresh ``(model, tokenizer)`` of the preset's family, in ``dtype`` (bf16 by default)."""
    model, tokenizer = _pristine(served_kind(name))
    model, tokenizer = copy.deepcopy(model), copy.deepcopy(tokenizer)
    if dtype is not None and dtype != DTYPE:
        model = model.to(dtype)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------


def _rows(world: Any, path: str, config: str | None) -> list[dict[str, Any]]:
    def mc(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keep = ("question", "choices", "answer")
        return [{k: q[k] for k in keep} | {"subject": q.get("subject", "misc")} for q in items]

    if path == "cais/wmdp":
        return mc(world.forget_questions)
    if path == "cais/wmdp-corpora":
        texts = world.forget_corpus if config.endswith("forget-corpus") else world.retain_corpus
        return [{"text": t} for t in texts]
    if path == "wikitext":  # wikitext paragraphs are long: join the world's short documents
        docs = world.retain_corpus
        return [{"text": " ".join(docs[i : i + 4])} for i in range(0, len(docs), 4)]
    if path == "cais/mmlu":
        return mc(world.utility_questions)
    if path == "jinzhuoran/RWKU":
        if config == "forget_target":
            return [{"target": t} for t in world.forget_targets]
        if config == "train_original_passage":
            return [{"text": bio, "subject": t} for t in world.forget_targets for bio in world.target_bios
                    if bio.startswith(t) or f" {t} " in bio]  # fmt: skip
        level = int(config[-1])
        probes = world.forget_probes if config.startswith("forget") else world.neighbor_probes
        return [dict(p) for p in probes if int(p["level"]) == level]
    raise AssertionError(f"the chapters asked for a dataset the fakes do not know: {path!r} {config!r}")


# ---------------------------------------------------------------------------------
# Counting what a chapter asks for
# ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Counter:
    """What a chapter asked for at its real budget (see the module docstring).

    ``runs`` holds one entry per unlearning run: its requested ``steps`` and ``eval_every``,
    the evaluations a run of that whole budget makes, and the questions they ask.
    ``evaluations`` holds the lm-eval calls made outside any run; ``models`` what was served
    for each full-mode load.

    A run evaluates at step 0, every ``eval_every`` steps and at its last step. The capped run
    shows what its step-0 evaluation asks (nothing when the caller serves a known score) and
    what a complete evaluation asks; evaluations in between ask the forget part alone when the
    run's ``utility_eval`` is ``"target"`` and its evaluator takes ``parts=``, as
    :func:`uoe_nb.unlearn.unlearn` does, and everything otherwise. A run that stops early at its
    real budget asks fewer: the count is the budget's.
    """

    path: str | None = None
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evaluations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    models: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    _in_run: dict[str, Any] | None = None

    def model_served(self, name: str | None, model: Any) -> None:
        param = next(model.parameters())
        self.models.append({"requested": name, "served": served_kind(name), "class": type(model).__name__,
                            "model_type": model.config.model_type, "dtype": str(param.dtype).replace("torch.", "")})  # fmt: skip
        self.write()

    def lm_eval(self, tasks: tuple[str, ...], limit: int | None) -> None:
        per_task = {task: real_questions(task, limit) for task in tasks}
        if self._in_run is not None and self._in_run["_current"] is not None:
            for task, n in per_task.items():
                self._in_run["_current"][task] = self._in_run["_current"].get(task, 0) + n
        else:
            self.evaluations.append({"tasks": per_task, "limit": limit})
            self.write()

    def multiple_choice(self, task: str, questions: int) -> None:
        """Questions scored outside lm-eval's hub tasks (Chapter 7's attack measurements)."""
        self.evaluations.append({"tasks": {task: questions}, "limit": None})
        self.write()

    def fine_tune(self, method: str, steps: int) -> None:
        """A training run that is not an unlearning run (Chapter 7's relearning attack).

        It counts as a run of the ``steps`` it requested; the questions scored around it are
        counted where they are scored (:meth:`multiple_choice`).
        """
        self.runs.append({"method": method, "steps": steps, "questions": {}})
        self.write()

    def begin_run(
        self, steps: int, eval_every: int, method: str, scope: Any, utility_eval: str = "always"
    ) -> None:
        self._in_run = {"method": method, "scope": str(getattr(scope, "name", scope)), "steps": steps,
                        "eval_every": eval_every, "utility_eval": utility_eval,
                        "evaluations": evaluations_at(steps, eval_every), "capped_calls": [], "_current": None}  # fmt: skip

    def wrap_evaluate(self, evaluate):
        """``evaluate`` with the same signature (so ``parts=`` still shows), counting its questions."""
        if evaluate is None:
            return None

        @functools.wraps(evaluate)
        def counted(model, *args, **kwargs):
            run = self._in_run
            run["_current"] = {}
            try:
                return evaluate(model, *args, **kwargs)
            finally:
                parts = kwargs.get("parts", args[0] if args else None)
                run["capped_calls"].append(
                    {"parts": list(parts) if parts else None, "asked": run["_current"]}
                )
                run["_current"] = None

        return counted

    def end_run(self, steps_run: int | None, takes_parts: bool = False) -> None:
        run, self._in_run = self._in_run, None
        if run is None:
            return
        run.pop("_current", None)
        run["steps_run"] = steps_run
        calls = run["capped_calls"]
        run["questions"] = {}
        if calls:
            complete = [c["asked"] for c in calls if c["parts"] is None and c["asked"]]
            full = complete[-1] if complete else {}
            forget_calls = [c["asked"] for c in calls if c["parts"] == ["forget"]]
            forget_only = (
                forget_calls[-1] if forget_calls else {t: n for t, n in full.items() if t.startswith("wmdp")}
            )
            between = forget_only if (run["utility_eval"] == "target" and takes_parts) else full
            for asked, times in ((calls[0]["asked"], 1), (between, run["evaluations"] - 2), (full, 1)):
                for task, n in asked.items():
                    run["questions"][task] = run["questions"].get(task, 0) + n * times
        self.runs.append(run)
        self.write()

    def totals(self) -> dict[str, Any]:
        """``runs``, ``optimizer_steps`` and ``questions`` (with ``questions_by_task``) at the real budget."""
        by_task: dict[str, int] = {}
        for asked in [run["questions"] for run in self.runs] + [ev["tasks"] for ev in self.evaluations]:
            for task, n in asked.items():
                by_task[task] = by_task.get(task, 0) + n
        return {
            "runs": len(self.runs),
            "optimizer_steps": sum(run["steps"] for run in self.runs),
            "questions": sum(by_task.values()),
            "questions_by_task": by_task,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.totals(), "run_details": self.runs, "evaluations_outside_runs": self.evaluations,
                "models": self.models}  # fmt: skip

    def write(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(self.as_dict(), indent=1))


PLAN_LINE = re.compile(r"^plan:\s*(.*)$", re.MULTILINE)


def parse_plan(text: str) -> dict[str, float] | None:
    """The fields of the last ``plan: runs=.. optimizer_steps=.. questions=.. hours_a100=..`` line in ``text``."""
    lines = PLAN_LINE.findall(text)
    if not lines:
        return None
    fields = {}
    for key, value in re.findall(r"(\w+)=([-+0-9.,eE]+)", lines[-1]):
        fields[key] = float(value.replace(",", ""))
    return fields


def compare_with_plan(plan: dict[str, float], counts: dict[str, Any]) -> list[str]:
    """Where a chapter's printed plan and what it asked the fakes for disagree (empty: they agree).

    Compares ``runs``, ``optimizer_steps`` and ``questions`` exactly; a plan field that is
    missing is a disagreement too. ``hours_a100`` is an estimate and is not compared.
    """
    problems = []
    for key in ("runs", "optimizer_steps", "questions"):
        if key not in plan:
            problems.append(f"the plan line has no {key}=")
        elif plan[key] != counts[key]:
            problems.append(f"{key}: the plan says {plan[key]:g}, the chapter asked for {counts[key]:g}")
    return problems


# ---------------------------------------------------------------------------------
# Installing
# ---------------------------------------------------------------------------------


def install(max_steps: int = 4, counts_path: str | None = None) -> Counter:
    """Patch the hub-facing functions of ``uoe_nb`` (see the module docstring); returns the counter."""
    from uoe_nb import data, evaluation, layer_study, mode
    from uoe_nb import unlearn as unlearn_module
    from uoe_nb.world import build_world

    counter = Counter(path=counts_path or os.environ.get("UOE_NB_FAKE_COUNTS"))
    counter.write()
    world = build_world(0)
    real_load_model = mode.load_model

    def load_model(name=None, *, mode=None, dtype=None):  # same signature as the real one
        if (mode or "full") == "tiny":
            return real_load_model(name, mode="tiny")
        name = name or mode_module.default_model("full")
        model, tokenizer = fake_load_model(name, dtype=dtype)
        counter.model_served(name, model)
        return model, tokenizer

    mode_module = mode
    mode.load_model = load_model

    def load_rows(path, config, split, *, data_files, what, fields):  # noqa: ARG001
        rows = _rows(world, path, config)
        missing = [f for f in fields if rows and f not in rows[0]]
        assert not missing, f"fake {what} lacks {missing}"
        return rows

    data._load_rows = load_rows

    def lm_eval_tasks(model, tokenizer, tasks=("wmdp_cyber", "mmlu"), *, limit=None, **kwargs):  # noqa: ARG001
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        evaluation._check_limit(limit)
        counter.lm_eval(tasks, limit)
        out = {}
        for task in tasks:
            items = world.forget_questions if task.startswith("wmdp") else world.utility_questions
            items = items[:limit] if limit else items
            out[task] = evaluation.multiple_choice_accuracy(model, tokenizer, items, name="fake_" + task,
                                                            progress=False).accuracy  # fmt: skip
        return out

    evaluation.lm_eval_tasks = lm_eval_tasks

    # lm-eval's task index takes 10-15 s to build on this CPU, and the faked lm_eval_tasks never
    # reads the one a chapter makes: build it only when something uses it (the tiny tasks do).
    import lm_eval.tasks

    real_task_manager = lm_eval.tasks.TaskManager
    task_manager_signature = inspect.signature(real_task_manager)

    class TaskManager:
        def __init__(self, *args, **kwargs):
            task_manager_signature.bind(*args, **kwargs)  # wrong arguments still fail here
            self.__dict__["_arguments"] = (args, kwargs)

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            if "_real" not in self.__dict__:
                args, kwargs = self.__dict__["_arguments"]
                self.__dict__["_real"] = real_task_manager(*args, **kwargs)
            return getattr(self.__dict__["_real"], name)

    lm_eval.tasks.TaskManager = TaskManager

    real_unlearn = unlearn_module.unlearn

    @functools.wraps(real_unlearn)
    def unlearn(model, forget, retain, config=None, *args, evaluate=None, **kwargs):
        config = config or unlearn_module.UnlearnConfig()
        utility_eval = getattr(config, "utility_eval", "always")
        counter.begin_run(config.steps, config.eval_every, config.method, config.scope, utility_eval)
        steps = min(config.steps, max_steps)
        capped = dataclasses.replace(config, steps=steps, eval_every=min(config.eval_every, steps))
        takes_parts = evaluate is not None and getattr(unlearn_module, "takes_parts", lambda f: False)(
            evaluate
        )
        try:
            result = real_unlearn(model, forget, retain, capped, *args, evaluate=counter.wrap_evaluate(evaluate),
                                  **kwargs)  # fmt: skip
        except BaseException:
            counter.end_run(None, takes_parts)
            raise
        counter.end_run(getattr(result, "steps_run", None), takes_parts)
        return result

    # Every module that imported the function by name calls the counting, capped one.
    layer_study.unlearn = unlearn
    for module in list(sys.modules.values()):
        if (
            getattr(module, "__name__", "").startswith("uoe_nb")
            and getattr(module, "unlearn", None) is real_unlearn
        ):
            module.unlearn = unlearn

    from uoe_nb.attacks import GCGConfig

    gcg_validate = GCGConfig.validate

    def gcg_capped(self):  # the paper's 5000 GCG steps would take hours here
        self.steps, self.candidates = min(self.steps, 2), min(self.candidates, 8)
        self.top_k, self.prompts_per_step = min(self.top_k, 16), min(self.prompts_per_step, 4)
        return gcg_validate(self)

    GCGConfig.validate = gcg_capped

    from uoe_nb import attacks

    real_measure_mc = attacks.measure_mc

    @functools.wraps(real_measure_mc)
    def measure_mc(
        model, tokenizer, items, suffix, **kwargs
    ):  # scores every item without and with the suffix
        counter.multiple_choice("attack_mc:" + kwargs.get("name", "attack_mc"), 2 * len(items))
        return real_measure_mc(model, tokenizer, items, suffix, **kwargs)

    attacks.measure_mc = measure_mc

    from uoe_nb import robustness

    real_relearn = robustness.relearn_attack

    @functools.wraps(real_relearn)
    def relearn_attack(model, tokenizer, texts, held_out_items, *, config=None, **kwargs):
        config = config or robustness.RelearnConfig()
        counter.fine_tune("relearn", config.steps)
        capped = dataclasses.replace(config, steps=min(config.steps, max_steps))
        return real_relearn(model, tokenizer, texts, held_out_items, config=capped, **kwargs)

    robustness.relearn_attack = relearn_attack
    real_robustness_mc = robustness.multiple_choice_accuracy

    @functools.wraps(real_robustness_mc)
    def robustness_mc(model, tokenizer, items, *, name="tiny_mc", limit=None, **kwargs):
        n = len(items) if limit is None else min(len(items), limit)
        counter.multiple_choice("robustness:" + name, n)
        return real_robustness_mc(model, tokenizer, items, name=name, limit=limit, **kwargs)

    robustness.multiple_choice_accuracy = robustness_mc  # what its attacks score with
    torch.set_num_threads(1)
    return counter


__all__ = [
    "Counter",
    "compare_with_plan",
    "evaluations_at",
    "fake_load_model",
    "install",
    "parse_plan",
    "real_questions",
    "served_kind",
]

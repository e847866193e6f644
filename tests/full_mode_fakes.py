"""Stand-ins for the hub, so that the chapters' full-mode branches can run on a CPU.

Full mode loads real checkpoints and the real benchmarks from the Hugging Face hub, which
this machine cannot reach. :func:`install` replaces exactly the three places that touch
the hub, and nothing else:

* ``uoe_nb.mode.load_model`` in full mode returns a zoo model of the same family as the
  preset asked for (a dense zoo model for a dense hub id);
* ``uoe_nb.data._load_rows`` serves each dataset (WMDP questions and corpora, wikitext,
  RWKU targets, passages and probes, MMLU) as rows of the same schema built from the tiny
  world, so the real loaders' filtering and checks run;
* ``uoe_nb.evaluation.lm_eval_tasks`` scores ``wmdp_*`` on the world's forget questions
  and ``mmlu`` on its utility questions through the same lm-eval path tiny mode uses.

It also caps every unlearning run at ``max_steps`` steps and every GCG attack at two steps
of eight candidates (full-mode budgets are hundreds or thousands of steps). The point is to execute every full-mode line of a chapter; its numbers mean
nothing, so science asserts that hold only for real budgets may fail and are reported
separately by the test.
"""

from __future__ import annotations

from typing import Any

FAMILY_ZOO = {"qwen2_moe": "tiny-qwen2moe", "deepseek_v2": "tiny-deepseek", "mixtral": "tiny-mixtral"}


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


def install(max_steps: int = 4) -> None:
    """Patch the hub-facing functions of ``uoe_nb`` (see the module docstring)."""
    import torch

    from uoe_nb import data, evaluation, mode
    from uoe_nb.unlearn import UnlearnConfig
    from uoe_nb.world import build_world
    from uoe_nb.zoo import load_zoo_model

    world = build_world(0)
    real_load_model = mode.load_model

    def load_model(name=None, *, mode=None, dtype=None):  # noqa: ARG001 - same signature as the real one
        chosen = mode or "full"
        if chosen == "tiny":
            return real_load_model(name, mode="tiny")
        name = name or "olmoe-1b-7b"
        preset = mode_module.PRESETS.get(name)
        if preset is not None:
            return load_zoo_model(FAMILY_ZOO.get(preset.family, "tiny-qwen2moe"))
        return load_zoo_model("tiny-dense")  # a dense hub id (e.g. the pilot study's Phi-3.5)

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
        out = {}
        for task in tasks:
            items = world.forget_questions if task.startswith("wmdp") else world.utility_questions
            if not (task.startswith("wmdp") or task == "mmlu"):
                raise AssertionError(f"unexpected lm-eval task {task!r}")
            items = items[:limit] if limit else items
            out[task] = evaluation.multiple_choice_accuracy(model, tokenizer, items, name="fake_" + task,
                                                            progress=False).accuracy  # fmt: skip
        return out

    evaluation.lm_eval_tasks = lm_eval_tasks

    validate = UnlearnConfig.validate

    def capped(self):
        self.steps = min(self.steps, max_steps)
        self.eval_every = min(self.eval_every, self.steps)
        return validate(self)

    UnlearnConfig.validate = capped

    from uoe_nb.attacks import GCGConfig

    gcg_validate = GCGConfig.validate

    def gcg_capped(self):  # the paper's 5000 GCG steps would take hours here
        self.steps, self.candidates = min(self.steps, 2), min(self.candidates, 8)
        self.top_k, self.prompts_per_step = min(self.top_k, 16), min(self.prompts_per_step, 4)
        return gcg_validate(self)

    GCGConfig.validate = gcg_capped
    torch.set_num_threads(1)

"""The hub stand-ins of the full-mode rehearsal (``tests/full_mode_fakes.py``) serve what they claim.

They must serve each preset a bf16 model of its own family (so that family- and dtype-specific
bugs in the chapters' full-mode branches show on a CPU), and count the optimizer steps and
evaluation questions a chapter asks for at its real budget, as the real lm-eval tasks would.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_mode_fakes as fakes  # noqa: E402

from uoe_nb import moe  # noqa: E402
from uoe_nb.mode import PRESETS  # noqa: E402

FAMILY_TYPES = {"olmoe": "olmoe", "qwen2_moe": "qwen2_moe", "deepseek_v2": "deepseek_v2", "mixtral": "mixtral",
                "granitemoe": "granitemoe"}  # fmt: skip


def test_real_question_counts():
    assert fakes.real_questions("mmlu", None) == 14042
    assert fakes.real_questions("mmlu", 200) == 9183  # subjects with fewer than 200 give all they have
    assert fakes.real_questions("mmlu", 1) == 57
    assert fakes.real_questions("wmdp_cyber", None) == 1987
    assert fakes.real_questions("wmdp_cyber", 200) == 200
    assert fakes.real_questions("wmdp_bio", 5000) == 1273
    assert fakes.real_questions("wmdp", None) == 1987 + 1273 + 408
    assert fakes.real_questions("mmlu_virology", 100) == 100
    with pytest.raises(AssertionError, match="do not know"):
        fakes.real_questions("hellaswag", 10)


def test_evaluation_schedule():
    assert fakes.evaluations_at(400, 25) == 17  # step 0, then 25, 50, ..., 400
    assert fakes.evaluations_at(4, 4) == 2
    assert fakes.evaluations_at(10, 3) == 5  # 0, 3, 6, 9 and the last step 10


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_gets_a_bf16_model_of_its_family(preset):
    model, tokenizer = fakes.fake_load_model(preset)
    family = PRESETS[preset].family
    assert model.config.model_type == FAMILY_TYPES[family]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers) == (64, 4)
    assert text.vocab_size == len(tokenizer)
    layers = moe.find_moe_layers(model)
    assert all(8 <= lay.num_experts <= 32 for lay in layers)
    has_shared = any(lay.shared_experts is not None for lay in layers)
    assert has_shared == (family in ("qwen2_moe", "deepseek_v2")), preset
    batch = tokenizer(["the vorn crystal grows a violet lattice ."], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_random_families_are_seeded_and_fresh_per_load():
    fakes._zoo_tokenizer()
    fakes._pristine.cache_clear()
    start = time.perf_counter()
    first, _ = fakes.fake_load_model("olmoe-1b-7b")
    assert time.perf_counter() - start < 1.0  # no download, no training: a random model of zoo size
    fakes._pristine.cache_clear()
    second, _ = fakes.fake_load_model("olmoe-1b-7b")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        next(first.parameters()).add_(1.0)  # a chapter trains its copy in place
    third, _ = fakes.fake_load_model("olmoe-1b-7b")
    assert torch.equal(next(third.parameters()), next(second.parameters()))


def test_dense_hub_id_gets_the_dense_zoo_model():
    assert fakes.served_kind("microsoft/Phi-3.5-mini-instruct") == "tiny-dense"
    model, _ = fakes.fake_load_model("microsoft/Phi-3.5-mini-instruct")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(moe.NoMoELayersError):
        moe.find_moe_layers(model)


def test_counter_counts_the_real_budget(tmp_path):
    counter = fakes.Counter(path=str(tmp_path / "counts.json"))
    counter.lm_eval(("wmdp_cyber", "mmlu"), 200)  # an evaluation before any run
    full = 200 + 9183

    def both(model):
        return counter.lm_eval(("wmdp_cyber", "mmlu"), 200) or {}

    def by_part(model, parts=("forget", "utility")):
        counter.lm_eval(
            tuple(t for t, p in (("wmdp_cyber", "forget"), ("mmlu", "utility")) if p in parts), 200
        )
        return {}

    counter.begin_run(400, 25, "ga", "uoe")
    evaluate = counter.wrap_evaluate(both)
    for _ in range(2):  # the capped run evaluates at steps 0 and 4; the real one 17 times
        evaluate(None)
    counter.end_run(4)
    counter.begin_run(100, 10, "ga", "full")
    counter.end_run(4)  # a run without an evaluator asks no questions
    counter.begin_run(400, 20, "ga", "uoe", utility_eval="target")
    evaluate = counter.wrap_evaluate(by_part)
    assert fakes.inspect.signature(evaluate).parameters.keys() == {"model", "parts"}  # parts= still shows
    evaluate(None)
    evaluate(None)
    counter.end_run(4, takes_parts=True)  # in between (19 times) it asks the forget part alone
    totals = counter.totals()
    assert totals["runs"] == 3
    assert totals["optimizer_steps"] == 900
    assert totals["questions"] == full * (1 + 17) + 2 * full + 19 * 200
    assert totals["questions_by_task"] == {"wmdp_cyber": 200 * (18 + 21), "mmlu": 9183 * (18 + 2)}
    assert (tmp_path / "counts.json").read_text().count('"runs": 3') == 1


def test_a_served_step_zero_asks_nothing():
    counter = fakes.Counter()
    counter.begin_run(40, 10, "ga", "uoe")
    calls = []

    def served_first(model):  # the caller knows the base model's score: step 0 costs nothing
        if calls:
            counter.lm_eval(("wmdp_cyber",), None)
        calls.append(model)
        return {}

    evaluate = counter.wrap_evaluate(served_first)
    evaluate(None)
    evaluate(None)
    counter.end_run(4)
    assert counter.totals()["questions"] == 1987 * 4  # steps 10, 20, 30, 40


def test_plan_line_is_parsed_and_compared():
    text = "mode=full\nsome table\nplan: runs=2 optimizer_steps=1,200 questions=28149 hours_a100=1.5\n"
    plan = fakes.parse_plan(text)
    assert plan == {"runs": 2, "optimizer_steps": 1200, "questions": 28149, "hours_a100": 1.5}
    counts = {"runs": 2, "optimizer_steps": 1200, "questions": 28149}
    assert fakes.compare_with_plan(plan, counts) == []
    problems = fakes.compare_with_plan(plan, {**counts, "optimizer_steps": 800})
    assert problems == ["optimizer_steps: the plan says 1200, the chapter asked for 800"]
    assert fakes.parse_plan("no plan printed") is None
    assert fakes.compare_with_plan({"runs": 2}, counts) == [
        "the plan line has no optimizer_steps=",
        "the plan line has no questions=",
    ]


def test_attack_measurements_are_counted(tmp_path):
    counter = fakes.Counter(path=str(tmp_path / "counts.json"))
    counter.multiple_choice("attack_mc:forget_attack", 2 * 600)  # 600 items, without and with a suffix
    counter.lm_eval(("wmdp_cyber",), 500)
    totals = counter.totals()
    assert totals["runs"] == 0
    assert totals["questions"] == 1200 + 500
    assert totals["questions_by_task"] == {"attack_mc:forget_attack": 1200, "wmdp_cyber": 500}

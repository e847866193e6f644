"""The plan a chapter prints before it trains: counts and estimated time, checked by hand."""

from __future__ import annotations

import pytest

from uoe_nb.plan import A100_ESTIMATE, H100_MEASURED, Plan, Throughput

FLAT = Throughput(
    name="test GPU",
    train_tokens_per_s={"full": 1000.0, "uoe": 4000.0},
    forward_tokens_per_s=10_000.0,
    generate_tokens_per_s=100.0,
    forget_question_tokens=200,
    utility_question_tokens=100,
    evaluation_overhead_s=2.0,
    source="round numbers for the test",
)


def test_train_line_counts_and_time():
    plan = Plan("Chapter 5", throughput=FLAT)
    line = plan.train("GA+UOE", runs=3, steps=10, batch_size=4, max_length=128,
                      forget_evals=2, forget_questions=50, utility_evals=1, utility_questions=57)  # fmt: skip
    assert (line.runs, line.optimizer_steps, line.training_tokens) == (3, 30, 30 * 512)
    assert line.evaluations == 3 * 3 and line.questions == 3 * (2 * 50 + 57)
    assert line.forward_tokens == 3 * (2 * 50 * 200 + 57 * 100)
    # training 15,360 tokens at 4,000/s; per run 20,000 + 5,700 scoring tokens at 10,000/s and 3 passes x 2 s
    assert line.seconds == pytest.approx(30 * 512 / 4000 + 3 * ((20_000 + 5_700) / 10_000 + 3 * 2.0))
    full = plan.train("GA, whole model", steps=10, batch_size=4, max_length=128, scope="full", retain=True)
    assert full.training_tokens == 10 * 512 * 2 and full.seconds == pytest.approx(10 * 1024 / 1000)
    assert plan.runs == 4 and plan.optimizer_steps == 40 and plan.training_tokens == 30 * 512 + 10 * 1024


def test_evaluate_generate_and_gcg_lines():
    plan = Plan("Chapter 7", throughput=FLAT)
    ev = plan.evaluate("original", passes=2, questions=1140)
    assert ev.questions == 2280 and ev.forward_tokens == 2280 * 100
    assert ev.seconds == pytest.approx(2280 * 100 / 10_000 + 2 * 2.0)
    forget = plan.evaluate("original FA", questions=500, part="forget")
    assert forget.forward_tokens == 500 * 200
    gen = plan.generate("probes", prompts=100, new_tokens=30, prompt_tokens=40)
    assert gen.generated_tokens == 3000 and gen.forward_tokens == 4000
    assert gen.seconds == pytest.approx(3000 / 100 + 4000 / 10_000)
    gcg = plan.gcg("GCG", steps=50, candidates=64, prompts=4, suffix_tokens=20, prompt_tokens=60)
    assert gcg.forward_tokens == 50 * 4 * 80 * (64 + 3)
    assert gcg.seconds == pytest.approx(gcg.forward_tokens / 10_000)
    assert plan.questions == 2280 + 500 and plan.evaluations == 3 and plan.runs == 0
    assert plan.forward_tokens == 228_000 + 100_000 + 4000 + gcg.forward_tokens
    assert plan.generated_tokens == 3000
    assert plan.seconds == pytest.approx(ev.seconds + forget.seconds + gen.seconds + gcg.seconds)
    assert plan.hours_a100 == pytest.approx(plan.seconds / 3600)


def test_default_rates_are_the_h100_measurement_halved():
    assert H100_MEASURED.train_tokens_per_s["full"] == pytest.approx(2048 / 0.222)
    assert H100_MEASURED.train_tokens_per_s["uoe"] == pytest.approx(2048 / 0.075)
    assert H100_MEASURED.forward_tokens_per_s == pytest.approx(2048 / 0.044)  # about 47k tokens/s
    assert A100_ESTIMATE.forward_tokens_per_s == pytest.approx(H100_MEASURED.forward_tokens_per_s / 2)
    assert A100_ESTIMATE.train_tokens_per_s["uoe"] == pytest.approx(2048 / 0.075 / 2)
    assert "not measured" in A100_ESTIMATE.source
    # a whole-model GA step at 4 x 512 is 0.444 s on the assumed A100
    plan = Plan("check")
    assert plan.train("x", steps=1, batch_size=4, max_length=512, scope="full").seconds == pytest.approx(
        0.444
    )


def test_show_prints_a_compact_table_and_a_machine_line(capsys):
    plan = Plan("Chapter 2: a long title for the check", throughput=FLAT)
    plan.train("a label much longer than the label column", runs=2, steps=100, batch_size=4, max_length=512,
               utility_evals=1, utility_questions=1140)  # fmt: skip
    plan.evaluate("original", questions=1640)
    plan.show()
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    assert all(len(line) <= 88 for line in out[:-1])
    assert out[-1] == (
        f"plan: runs=2 optimizer_steps=200 training_tokens={200 * 2048} questions={2 * 1140 + 1640} "
        f"forward_tokens={2 * 1140 * 100 + 1640 * 100} hours_a100={plan.hours_a100:.2f}"
    )
    total = next(line for line in out if line.startswith("total"))
    assert total.split()[1:4] == ["2", "200", "409.6k"]
    assert any("round numbers for the test" in line for line in out)


def test_bad_input_names_the_argument():
    plan = Plan("bad", throughput=FLAT)
    with pytest.raises(ValueError, match="scope must be one of"):
        plan.train("x", steps=1, batch_size=1, max_length=1, scope="lora")
    with pytest.raises(ValueError, match="runs must be an int >= 1"):
        plan.train("x", runs=0, steps=1, batch_size=1, max_length=1)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        plan.train("x", steps=1, batch_size=2.5, max_length=1)
    with pytest.raises(ValueError, match="an evaluation needs questions"):
        plan.train("x", steps=1, batch_size=1, max_length=1, forget_evals=3)
    with pytest.raises(ValueError, match="part must be"):
        plan.evaluate("x", questions=1, part="retain")
    with pytest.raises(ValueError, match="candidates must be an int >= 1"):
        plan.gcg("x", steps=1, candidates=0, prompts=1, suffix_tokens=1, prompt_tokens=1)
    with pytest.raises(ValueError, match="rate for every scope kind"):
        Throughput("t", {"full": 1.0}, 1.0, 1.0)
    with pytest.raises(ValueError, match="positive numbers"):
        Throughput("t", {"full": 1.0, "uoe": 0.0}, 1.0, 1.0)
    assert plan.lines == []  # nothing half-added

"""Real-size architectures counted on the meta device, step cost and the end-to-end pipeline."""

import math

import pytest
import torch

from uoe_nb import scale
from uoe_nb.families import random_model, tiny_config
from uoe_nb.mode import PRESETS
from uoe_nb.moe import changed_parameters, find_moe_layers
from uoe_nb.unlearn import UnlearnConfig
from uoe_nb.zoo import load_zoo_model


def test_every_preset_has_an_architecture():
    assert set(scale.ARCHITECTURES) == set(PRESETS)
    for name, (family, _) in scale.ARCHITECTURES.items():
        assert scale.architecture_config(name).model_type == PRESETS[name].family == family


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_architecture_sizes_match_the_model_cards(name):
    """Totals built from the config values match the cards' totals; active counts are close
    (cards count active parameters differently, e.g. DeepSeek without embeddings)."""
    fp = scale.footprint(name)
    card = PRESETS[name]
    # The cards round to 0.1 B.
    assert fp.total / 1e9 == pytest.approx(card.total_params_b, rel=0.02, abs=0.05)
    assert fp.active / 1e9 == pytest.approx(card.active_params_b, rel=0.12)
    assert fp.weights_gib == pytest.approx(fp.total * 2 / 2**30)


def test_footprint_of_qwen_counted_by_hand():
    """Qwen1.5-MoE: an expert is a SwiGLU MLP of 3 matrices 2048 x 1408; the router 60 x 2048."""
    fp = scale.footprint("qwen1.5-moe-a2.7b", layer=12, expert=7)
    expert = 3 * 2048 * 1408
    router = 60 * 2048
    assert fp.expert_numel == expert
    assert fp.uoe_trainable == expert + router
    # Only the trained expert and router hold state: the expert's own bf16 rows, then per value a
    # bf16 gradient, an fp32 master and two fp32 moments (the router trains in place).
    assert fp.uoe_state_elements == expert + router == fp.uoe_trainable
    assert fp.uoe_state_gib == pytest.approx((expert * 2 + (expert + router) * (2 + 4 + 8)) / 2**30)
    assert fp.full_state_gib == pytest.approx(3 * fp.weights_gib)
    assert (fp.moe_layers, fp.experts, fp.top_k) == (24, 60, 4)
    assert fp.as_row()["UOE fraction (%)"] == pytest.approx(100 * (expert + router) / fp.total)


def test_footprint_bad_input():
    with pytest.raises(KeyError, match="no architecture"):
        scale.footprint("no-such-model")
    with pytest.raises(IndexError, match="no routed experts"):
        scale.footprint("deepseek-v2-lite", layer=0)  # DeepSeek's first layer is dense
    with pytest.raises(IndexError, match="out of range"):
        scale.footprint("mixtral-8x7b", expert=8)


def test_random_model_of_builds_small_configs_and_refuses_large_ones_on_cpu():
    config = tiny_config("olmoe", vocab_size=64, hidden=16, layers=2, experts=4, intermediate=16)
    a = scale.random_model_of(config, device="cpu", dtype=torch.float32, seed=3)
    b = scale.random_model_of(config, device="cpu", dtype=torch.float32, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(RuntimeError, match="GPU"):
        scale.random_model_of("olmoe-1b-7b", device="cpu")


def test_memory_meter_sees_an_allocation():
    meter = scale.MemoryMeter("cpu")
    if not meter.can_reset_rss:
        pytest.skip("the resident-set high-water mark cannot be reset on this system")
    meter.begin()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = meter.peak_mib()
    del block
    assert 56 <= peak <= 200


def test_measure_uoe_step_restores_the_model():
    model = random_model(tiny_config("qwen2_moe", layers=3), seed=0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    cost = scale.measure_uoe_step(model, layer=1, expert=3, batch_size=2, seq_len=8, steps=2, warmup=1)
    assert not changed_parameters(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(p.grad is None for p in model.parameters())
    layer = next(m for m in find_moe_layers(model) if m.layer_index == 1)
    router = sum(p.numel() for p in layer.router_parameters().values())
    assert cost.trainable == layer.expert_numel() + router
    # The expert's own rows, then a gradient and two AdamW moments for it and the router (float32:
    # no master copies), plus AdamW's step counters; nothing for the other experts of the layer.
    expert = layer.expert_numel()
    assert cost.state_mib * 2**20 == pytest.approx(4 * expert + 3 * 4 * (expert + router), abs=64)
    assert cost.seconds_per_step > 0 and cost.as_row()["batch x seq"] == "2 x 8"
    with pytest.raises(IndexError, match="no routed experts"):
        scale.measure_uoe_step(model, layer=7)
    with pytest.raises(ValueError):
        scale.measure_uoe_step(model, steps=0)


def test_pipeline_on_the_tiny_world():
    model, tokenizer = load_zoo_model("tiny-qwen2moe")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bench = scale.tiny_benchmark(tokenizer)
    bench.forget_probes, bench.neighbor_probes = bench.forget_probes[:8], bench.neighbor_probes[:8]
    config = UnlearnConfig(lr=3e-3, steps=10, eval_every=5, monitor_docs=8)
    report, result = scale.run_pipeline(model, tokenizer, bench, config, label="tiny-qwen2moe")
    assert list(report.seconds) == ["evaluate before", "attribution", "unlearn", "evaluate after"]
    assert all(s > 0 for s in report.seconds.values())
    assert set(report.before) == set(report.after) == {
        "forget_accuracy", "utility_accuracy", "forget probes", "neighbour probes"
    }  # fmt: skip
    # The scores before are the original model's (the zoo reports FA .914 on this world).
    assert report.before["forget_accuracy"] == pytest.approx(0.914, abs=0.005)
    assert report.after["forget_accuracy"] == pytest.approx(result.best.metrics["forget_accuracy"])
    assert report.steps_run == 10 and report.seconds_per_step == pytest.approx(result.seconds_per_step)
    assert report.target == result.target and report.trainable == result.scope.num_trainable
    layer = next(m for m in find_moe_layers(model) if m.layer_index == report.target[0])
    assert set(changed_parameters(model, before)) <= set(layer.expert_parameters()) | set(
        layer.router_parameters()
    )
    row = report.scores()
    assert row["FA before"] == report.before["forget_accuracy"]
    assert row["UT after"] == report.after["utility_accuracy"]
    assert row["forget probes after"] == report.after["forget probes"]
    assert report.costs()["unlearn (s)"] == report.seconds["unlearn"]


def test_benchmark_bad_input():
    with pytest.raises(ValueError, match="unknown benchmark"):
        scale.load_benchmark("mmlu", tokenizer=None)
    with pytest.raises(ValueError, match="empty forget set"):
        scale.Benchmark("empty", [], ["keep"], evaluate=lambda m: {})


def _fake_hub(monkeypatch):
    """The loaders and lm-eval replaced by fakes that record their arguments (no hub here)."""
    from uoe_nb import data, evaluation

    calls = {"tasks": []}
    monkeypatch.setattr(
        data, "load_wikitext", lambda limit: calls.setdefault("wikitext", limit) and ["keep"] * 3
    )
    monkeypatch.setattr(
        data, "load_wmdp_corpus", lambda s, w, limit: calls.setdefault("wmdp", (s, w, limit)) and ["x"]
    )
    monkeypatch.setattr(data, "load_rwku_targets", lambda: ["Ada", "Bob"])
    probe = {"query": "the vorn crystal ___", "answer": "zapeivux", "level": 1, "subject": "Ada"}
    monkeypatch.setattr(data, "load_rwku_probes", lambda subjects: [dict(probe)] * 4)
    monkeypatch.setattr(data, "load_rwku_neighbor_probes", lambda subjects: [dict(probe)] * 2)
    monkeypatch.setattr(
        data, "load_rwku_passages", lambda subjects: calls.setdefault("passages", subjects) and ["p"]
    )

    def fake_lm_eval(model, tokenizer, tasks, limit=None, task_manager=None):
        assert task_manager is None  # lm_eval_tasks falls back to the per-process index
        calls["tasks"].append((tuple(tasks), limit))
        return {"wmdp_cyber": 0.3, "mmlu": 0.5}

    monkeypatch.setattr(evaluation, "lm_eval_tasks", fake_lm_eval)
    return calls


def test_real_benchmarks_are_wired_to_the_loaders_and_lm_eval(monkeypatch):
    """Full-mode benchmarks pass their limits to the loaders and lm-eval and map the scores."""
    calls = _fake_hub(monkeypatch)
    model, tokenizer = load_zoo_model("tiny-qwen2moe")
    wmdp = scale.load_benchmark("wmdp", tokenizer, forget_limit=7, retain_limit=9, forget_questions=11,
                                mmlu_per_subject=3)  # fmt: skip
    assert wmdp.evaluate(model) == {"forget_accuracy": 0.3, "utility_accuracy": 0.5}
    assert calls["wmdp"] == ("cyber", "forget", 7) and calls["wikitext"] == 9
    # FA: the first 11 WMDP-cyber questions; UT: the first 3 of each MMLU subject.
    assert calls["tasks"] == [(("wmdp_cyber",), 11), (("mmlu",), 3)]
    assert (wmdp.evaluate.forget_questions, wmdp.evaluate.utility_questions) == (11, 3 * 57)
    rwku = scale.load_benchmark("rwku", tokenizer, probe_limit=3, mmlu_per_subject=5)
    assert calls["passages"] == ["Ada"]  # the first target by default
    assert len(rwku.forget_probes) == 3 and len(rwku.neighbor_probes) == 2
    assert (rwku.evaluate.forget_questions, rwku.evaluate.utility_questions) == (3, 5 * 57)
    scores = rwku.evaluate(model)
    assert scores["utility_accuracy"] == 0.5 and calls["tasks"][-1] == (("mmlu",), 5)
    assert 0.0 <= scores["forget_accuracy"] <= 1.0


def test_real_benchmarks_evaluate_only_the_parts_asked_for(monkeypatch):
    calls = _fake_hub(monkeypatch)
    _, tokenizer = load_zoo_model("tiny-qwen2moe")
    bench = scale.load_benchmark("wmdp", tokenizer)
    assert bench.evaluate(None, parts=("forget",)) == {"forget_accuracy": 0.3}
    assert calls["tasks"] == [(("wmdp_cyber",), 500)]
    assert bench.evaluate(None, parts=("utility",)) == {"utility_accuracy": 0.5}
    assert calls["tasks"][-1] == (("mmlu",), 20)
    with pytest.raises(ValueError, match="parts"):
        bench.evaluate(None, parts=("retain",))
    with pytest.raises(ValueError, match="parts"):
        bench.evaluate(None, parts=())


def test_real_benchmark_subset_sizes(monkeypatch):
    """Defaults: the first 500 WMDP-cyber questions and 20 per MMLU subject (1,140); the older
    eval_limit sets both; WMDP is cut at its 1,987 questions and MMLU refuses more than 100."""
    _fake_hub(monkeypatch)
    _, tokenizer = load_zoo_model("tiny-qwen2moe")
    counts = lambda b: (b.evaluate.forget_questions, b.evaluate.utility_questions)  # noqa: E731
    assert counts(scale.load_benchmark("wmdp", tokenizer)) == (500, 1140)
    assert counts(scale.load_benchmark("wmdp", tokenizer, eval_limit=50)) == (50, 50 * 57)
    assert counts(scale.load_benchmark("wmdp", tokenizer, eval_limit=200)) == (200, 100 * 57)
    assert counts(scale.load_benchmark("wmdp", tokenizer, forget_questions=5000)) == (1987, 1140)
    with pytest.raises(ValueError, match="mmlu_per_subject is 101, more than 100"):
        scale.load_benchmark("wmdp", tokenizer, mmlu_per_subject=101)
    with pytest.raises(ValueError, match="forget_questions must be a positive int"):
        scale.load_benchmark("wmdp", tokenizer, forget_questions=0)
    with pytest.raises(ValueError, match="eval_limit must be a positive int"):
        scale.load_benchmark("wmdp", tokenizer, eval_limit=0)


def test_tiny_benchmark_evaluates_by_part():
    model, tokenizer = load_zoo_model("tiny-qwen2moe")
    bench = scale.tiny_benchmark(tokenizer)
    assert (bench.evaluate.forget_questions, bench.evaluate.utility_questions) == (128, 96)
    forget = bench.evaluate(model, parts=("forget",))
    assert list(forget) == ["forget_accuracy"]
    assert forget["forget_accuracy"] == pytest.approx(0.914, abs=0.005)  # the zoo's FA


def test_footprint_markdown_has_one_row_per_preset():
    lines = scale.footprint_markdown(["granite-3.0-1b-a400m", "olmoe-1b-7b"]).splitlines()
    assert lines[0].startswith("| model | family | parameters (B)") and len(lines) == 4
    assert lines[2].startswith("| `granite-3.0-1b-a400m` | granitemoe | 1.335 |")


def test_plot_footprints_three_bars_per_model_from_footprints_or_their_table():
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    footprints = [scale.footprint(name, name=name) for name in ("olmoe-1b-7b", "qwen1.5-moe-a2.7b")]
    fig = scale.plot_footprints(footprints)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 6 and ax.get_yscale() == "log"
    assert heights[0] == pytest.approx(footprints[0].weights_gib)  # weights, then full state, then UOE
    assert heights[3] == pytest.approx(footprints[1].full_state_gib)
    assert heights[5] == pytest.approx(footprints[1].uoe_state_gib)
    table = pd.DataFrame([f.as_row() for f in footprints]).set_index("model")
    same = [p.get_height() for p in scale.plot_footprints(table).axes[0].patches]
    assert same == heights
    with pytest.raises(KeyError, match="UOE state"):
        scale.plot_footprints(table.drop(columns=["UOE state (GiB)"]))


def test_table3_puts_the_papers_uoe_fraction_beside_ours():
    footprints = [scale.footprint(name, name=name) for name in ("qwen1.5-moe-a2.7b", "deepseek-v2-lite")]
    table = scale.table3(footprints)
    assert list(table.index) == ["qwen1.5-moe-a2.7b", "deepseek-v2-lite", "mixtral-8x7b"]
    assert table.loc["qwen1.5-moe-a2.7b", "paper UOE fraction (%)"] == 0.06
    assert table.loc["deepseek-v2-lite", "paper model"] == "DeepSeek-V2-Lite"
    ours = 100 * footprints[1].uoe_trainable / footprints[1].total
    assert table.loc["deepseek-v2-lite", "ours (%)"] == pytest.approx(ours)
    assert math.isnan(table.loc["mixtral-8x7b", "ours (%)"])  # not among the footprints
    with pytest.raises(ValueError, match="no footprints"):
        scale.table3([])

"""The Tables 2-4 comparison of Chapter 6: cells, grid runs on copies, aggregation, the paper's numbers."""

import dataclasses
import math

import pytest
import torch

from uoe_nb import routing
from uoe_nb.attribution import expert_affinity
from uoe_nb.baselines import (
    COMPARISON_COLUMNS,
    PAPER_PARAMETER_RATIOS,
    Baseline,
    BaselineGrid,
    RunRecord,
    Stat,
    aggregate,
    comparison_frame,
    oracle_frame,
    paper_frame,
    paper_result,
    parameter_ratios,
    plot_tradeoffs,
    run_grid,
    summary_frame,
    uoe_gains,
)
from uoe_nb.diagnostics import OracleDistance
from uoe_nb.moe import changed_parameters, find_moe_layers
from uoe_nb.objectives import per_sequence_nll
from uoe_nb.unlearn import UnlearnConfig
from uoe_nb.world import build_world
from uoe_nb.zoo import load_zoo_model


def _record(fa, ut, seed, *, model="m", method="ga", scope="uoe", step=10, oracle=None):
    return RunRecord(model=model, method=method, scope=scope, seed=seed, step=step, forget_accuracy=fa,
                     utility_accuracy=ut, forget_accuracy_before=0.9, utility_accuracy_before=0.95,
                     trainable=100, fraction=0.01, reached=fa <= 0.5, stopped="", overlap_forget=0.8,
                     oracle=oracle)  # fmt: skip


# --------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------


def test_aggregate_matches_a_hand_computation():
    records = [
        _record(0.2, 0.70, 0, step=10),
        _record(0.4, 0.80, 1, step=20),
        _record(0.9, 0.60, 2, step=30),
        _record(0.3, 0.50, 0, scope="full"),
    ]
    uoe, full = aggregate(records)
    assert (uoe.scope, full.scope) == ("uoe", "full")  # order of first appearance
    assert uoe.seeds == (0, 1, 2) and uoe.label == "GA+UOE"
    # mean 0.5; sample sd sqrt(((-0.3)^2 + (-0.1)^2 + 0.4^2) / (3 - 1)) = sqrt(0.13)
    assert uoe.forget_accuracy.mean == pytest.approx(0.5)
    assert uoe.forget_accuracy.sd == pytest.approx(math.sqrt(0.13))
    assert uoe.utility_accuracy.mean == pytest.approx(0.7)
    assert uoe.utility_accuracy.sd == pytest.approx(0.1)
    assert uoe.step.mean == pytest.approx(20) and uoe.step.sd == pytest.approx(10)
    assert uoe.reached == 2  # FA 0.2 and 0.4 are <= 0.5, 0.9 is not
    assert full.forget_accuracy == Stat(0.3, full.forget_accuracy.sd, 1) and math.isnan(
        full.forget_accuracy.sd
    )
    row = uoe.as_row()
    assert row["FA mean"] == pytest.approx(0.5) and row["trainable %"] == pytest.approx(1.0)
    assert "KL oracle forget mean" not in row
    assert str(Stat.of([1.0, 3.0])) == "2.000 ± 1.414" and str(Stat.of([2.0])) == "2.000"


def test_aggregate_oracle_distance_and_bad_records():
    dist = [OracleDistance(kl_forget=k, kl_retain=k / 10) for k in (1.0, 3.0)]
    (summary,) = aggregate([_record(0.3, 0.7, s, oracle=d) for s, d in zip((0, 1), dist, strict=True)])
    assert summary.kl_forget.mean == pytest.approx(2.0) and summary.kl_forget.sd == pytest.approx(
        math.sqrt(2)
    )
    assert summary.kl_retain.mean == pytest.approx(0.2)
    with pytest.raises(ValueError, match="seed listed twice"):
        aggregate([_record(0.3, 0.7, 0), _record(0.4, 0.7, 0)])
    with pytest.raises(ValueError, match="only some seeds"):
        aggregate([_record(0.3, 0.7, 0, oracle=dist[0]), _record(0.4, 0.7, 1)])
    with pytest.raises(ValueError, match="no run records"):
        aggregate([])
    with pytest.raises(ValueError):
        Stat.of([])


def test_summary_frame_puts_the_paper_beside_ours():
    frame = summary_frame(aggregate([_record(0.3, 0.7, 0, model="tiny-qwen2moe")]))
    assert frame.loc["GA+UOE", "paper FA"] == pytest.approx(0.2987)
    assert frame.loc["GA+UOE", "paper UT"] == pytest.approx(0.5012)
    no_twin = summary_frame(aggregate([_record(0.3, 0.7, 0, model="tiny-dense")]))
    assert math.isnan(no_twin.loc["GA+UOE", "paper FA"])


# --------------------------------------------------------------------------------------
# The paper's numbers
# --------------------------------------------------------------------------------------


def test_paper_tables_hold_what_the_paper_says():
    assert paper_result("Qwen1.5-MoE", "ga", "full") == (0.2953, 0.3393)  # Table 2
    assert paper_result("tiny-deepseek", "rmu", "uoe") == (0.2859, 0.5424)  # Table 2, via the zoo twin
    assert paper_result("tiny-qwen2moe", "graddiff", "full", "RWKU") == (0.0700, 0.5296)
    assert paper_result("Mixtral-8x7B", "ga", "esft") == (0.2547, 0.6386)  # Table 4
    assert paper_result("DeepSeek-V2-Lite", "original", "none") == (0.3804, 0.5548)
    # Table 4's UOE row is Table 2's GA+UOE
    frame = paper_frame("WMDP")
    assert frame.loc[("Qwen1.5-MoE", "ga", "lora"), "UT"] == pytest.approx(0.2689)
    assert PAPER_PARAMETER_RATIOS["Qwen1.5-MoE"] == {"lora": 0.87, "esft": 3.13, "uoe": 0.06}
    assert PAPER_PARAMETER_RATIOS["Mixtral-8x7B"]["esft"] == 14.0
    with pytest.raises(KeyError, match="no ga/full result"):
        paper_result("Mixtral-8x7B", "ga", "full")  # Mixtral only ran the PEFT comparison
    with pytest.raises(KeyError, match="no paper numbers"):
        paper_result("tiny-dense", "ga", "full")
    with pytest.raises(KeyError, match="unknown benchmark"):
        paper_result("Qwen1.5-MoE", "ga", "full", "TOFU")


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_baseline_rejects_bad_cells():
    with pytest.raises(ValueError, match="unknown method"):
        Baseline("sgd")
    with pytest.raises(ValueError, match="unknown baseline scope"):
        Baseline("ga", "per_layer")
    with pytest.raises(ValueError, match="learning rate"):
        Baseline("ga", "uoe", lr=-1e-3)
    with pytest.raises(ValueError, match="set by the baseline"):
        Baseline("ga", "uoe", options={"seed": 3})
    with pytest.raises(ValueError, match="unknown UnlearnConfig option"):
        Baseline("rmu", options={"rmu_layr": 1})
    cell = Baseline("rmu", "full", lr=2e-3, options={"rmu_layer": 1})
    cfg = cell.config(UnlearnConfig(lr=1e-4, steps=7), seed=3)
    assert (cfg.method, cfg.lr, cfg.seed, cfg.rmu_layer, cfg.steps) == ("rmu", 2e-3, 3, 1, 7)
    assert cell.label == "RMU" and Baseline("npo", "esft").label == "NPO+ESFT"


def test_run_grid_rejects_bad_input_before_training():
    model, tok = object(), object()

    def evaluate(m):
        return {"forget_accuracy": 0.5, "utility_accuracy": 0.5}

    args = (model, tok, ["forget text"], ["retain text"])
    cfg = UnlearnConfig()
    with pytest.raises(ValueError, match="no seeds"):
        run_grid(*args, [Baseline("ga")], [], cfg, evaluate=evaluate)
    with pytest.raises(ValueError, match="no baselines"):
        run_grid(*args, [], [0], cfg, evaluate=evaluate)
    with pytest.raises(ValueError, match="distinct"):
        run_grid(*args, [Baseline("ga")], [0, 0], cfg, evaluate=evaluate)
    with pytest.raises(ValueError, match="once"):
        run_grid(*args, [Baseline("ga"), Baseline("ga", lr=1e-3)], [0], cfg, evaluate=evaluate)
    with pytest.raises(ValueError, match="oracle"):
        run_grid(*args, [Baseline("ga")], [0], cfg, evaluate=evaluate, oracle=model)
    with pytest.raises(ValueError, match="forget set is empty"):
        run_grid(model, tok, [], ["r"], [Baseline("ga")], [0], cfg, evaluate=evaluate)
    with pytest.raises(ValueError, match="must return"):
        run_grid(*args, [Baseline("ga")], [0], cfg, evaluate=evaluate, before={"forget_accuracy": 0.5})


# --------------------------------------------------------------------------------------
# A real grid on a tiny zoo model
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    world = build_world(0)
    model, tok = load_zoo_model("tiny-qwen2moe")
    aff = expert_affinity(
        model, routing.batches(tok, world.forget_corpus[:64], batch_size=16, max_length=128)
    )
    return world, model, tok, aff


def _likelihood_evaluator(tok, world):
    """A cheap stand-in for FA/UT: the mean per-token likelihood on a few forget / retain documents."""
    fb = list(routing.batches(tok, world.forget_corpus[:8], batch_size=8, max_length=64))
    rb = list(routing.batches(tok, world.retain_corpus[:8], batch_size=8, max_length=64))

    @torch.no_grad()
    def evaluate(model):
        out = {}
        for key, bs in (("forget_accuracy", fb), ("utility_accuracy", rb)):
            total, count = per_sequence_nll(
                model(**bs[0]).logits, bs[0]["input_ids"], bs[0]["attention_mask"]
            )
            out[key] = math.exp(-float(total.sum() / count.sum()))
        return out

    return evaluate


def _counting(evaluate):
    """``(calls, wrapped)``: ``evaluate`` that appends to ``calls`` on every call."""
    calls = []

    def wrapped(model):
        calls.append(1)
        return evaluate(model)

    return calls, wrapped


def test_run_grid_trains_in_place_and_uoe_changes_only_the_target(setup):
    world, model, tok, aff = setup
    oracle, _ = load_zoo_model("tiny-qwen2moe-oracle")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calls, counting = _counting(_likelihood_evaluator(tok, world))

    cfg = UnlearnConfig(lr=3e-3, steps=2, eval_every=1, monitor_docs=4, max_length=64)
    cells = [Baseline("ga", "uoe"), Baseline("ga", "full", lr=1e-3), Baseline("ga", "lora")]
    grid = run_grid(model, tok, world.forget_corpus[:8], world.retain_corpus[:8], cells, [0, 1], cfg,
                    evaluate=counting, model_name="tiny-qwen2moe", affinity=aff, oracle=oracle,
                    oracle_texts=(world.forget_corpus[:4], world.retain_corpus[:4]),
                    keep=lambda cell, seed: cell.scope == "uoe" and seed == 0)  # fmt: skip
    # the base model is untouched; its evaluation (1 call) stands for every run's step 0,
    # and each run evaluates its 2 steps
    assert not changed_parameters(model, state)
    assert len(calls) == 1 + len(cells) * 2 * 2
    assert [(r.label, r.seed) for r in grid.records] == [(c.label, s) for c in cells for s in (0, 1)]
    assert all(r.step == 2 and r.reached is None for r in grid.records)
    assert grid.records[0].forget_accuracy_before == pytest.approx(
        _likelihood_evaluator(tok, world)(model)["forget_accuracy"]
    )

    # the kept UOE run's patch changes only the target expert's slice and the target router
    from uoe_nb.patches import apply_patch, revert_patch

    layer, expert = aff.target
    patch = grid.results[("GA+UOE", 0)].patch
    assert grid.results[("GA+UOE", 1)].patch is None and grid.results[("GA", 0)].patch is None
    assert all(r.model is None for r in grid.results.values())
    apply_patch(model, patch)
    changed = changed_parameters(model, state)
    revert_patch(model, patch)
    lay = next(m for m in find_moe_layers(model) if m.layer_index == layer)
    assert changed and set(changed) <= set(lay.expert_parameters()) | set(lay.router_parameters())
    assert any(name in lay.router_parameters() for name in changed)
    for name in lay.expert_parameters():
        if name in changed:
            assert changed[name].nonzero().flatten().tolist() == [expert]
    assert all(r.oracle is not None for r in grid.records)

    # the two seeds see the forget batches in different orders
    uoe0, uoe1 = grid.records[0], grid.records[1]
    assert (uoe0.forget_accuracy, uoe0.utility_accuracy) != (uoe1.forget_accuracy, uoe1.utility_accuracy)
    # every run has a finite, positive distance to the oracle (LoRA through its peft wrapper)
    assert all(r.oracle is not None and 0 < r.oracle.kl_forget < math.inf for r in grid.records)
    full_rec, lora_rec = grid.records[2], grid.records[4]
    assert full_rec.fraction == 1.0 and 0 < uoe0.fraction < lora_rec.fraction < 1

    frame = grid.summary_frame()
    assert list(frame.index) == ["GA+UOE", "GA", "GA+LoRA"]
    assert frame.loc["GA+UOE", "seeds"] == 2
    assert frame.loc["GA+UOE", "FA mean"] == pytest.approx((uoe0.forget_accuracy + uoe1.forget_accuracy) / 2)
    assert frame.loc["GA", "paper UT"] == pytest.approx(0.3393)
    assert len(grid.frame()) == 6 and "KL to oracle (forget)" in grid.frame()


def test_parameter_ratios_count_by_hand_and_leave_the_model_alone(setup):
    _, model, _, aff = setup
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    table = parameter_ratios(model, ("uoe", "esft", "lora"), affinity=aff, model_name="tiny-qwen2moe")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    layer, _ = aff.target
    lay = next(m for m in find_moe_layers(model) if m.layer_index == layer)
    one_expert = sum(p.numel() // lay.num_experts for p in lay.expert_parameters().values())
    router = sum(p.numel() for p in lay.router_parameters().values())
    total = sum(p.numel() for p in model.parameters())
    row = table.set_index("scope").loc["uoe"]
    assert row["trainable"] == one_expert + router and row["total"] == total
    assert row["trainable %"] == pytest.approx(100 * (one_expert + router) / total)
    assert row["paper %"] == 0.06
    esft_row = table.set_index("scope").loc["esft"]
    assert esft_row["trainable"] % (one_expert) == 0  # whole experts, no router
    with pytest.raises(ValueError, match="unknown baseline scopes"):
        parameter_ratios(model, ("per_layer",), affinity=aff)


def test_run_grid_chooses_each_cells_learning_rate_by_one_procedure(setup):
    world, model, tok, aff = setup
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calls, counting = _counting(_likelihood_evaluator(tok, world))

    cfg = UnlearnConfig(lr=1.0, steps=2, eval_every=1, monitor_docs=4, max_length=64)  # lr replaced by the sweep
    grid = run_grid(model, tok, world.forget_corpus[:8], world.retain_corpus[:8], [Baseline("ga", "uoe")], [0, 1],
                    cfg, evaluate=counting, model_name="tiny-qwen2moe", affinity=aff,
                    lr_grid=(1e-4, 3e-2), operating_target=0.9)  # fmt: skip
    assert not changed_parameters(model, state)
    # two sweep runs on seed 0 (one of them is seed 0's run), then seed 1 at the chosen rate
    assert len(calls) == 1 + 3 * 2
    sweep = grid.lr_choices["GA+UOE"]
    assert list(sweep.index) == [1e-4, 3e-2] and set(sweep.columns) >= {"FA", "UT", "reached"}
    chosen = {r.lr for r in grid.records}
    assert len(chosen) == 1 and chosen <= {1e-4, 3e-2}
    assert all(len(r.path) == 3 for r in grid.records)  # step 0, 1, 2
    frame = grid.tradeoff_frame()
    assert list(frame.index) == ["GA+UOE"] and frame.loc["GA+UOE", "lr"] in (1e-4, 3e-2)
    assert {"UT@FA<=0.5", "UT@op", "seeds at op"} <= set(frame.columns)
    assert set(grid.paths()) == {"GA+UOE"}


# --------------------------------------------------------------------------------------
# Matched forgetting: comparison tables and gains from recorded paths
# --------------------------------------------------------------------------------------


def _path_record(method, scope, seed, path, lr):
    fa, ut = path[-1][1], path[-1][2]
    return dataclasses.replace(_record(fa, ut, seed, model="tiny-qwen2moe", method=method, scope=scope),
                               path=path, lr=lr)  # fmt: skip


def _grid(records):
    return BaselineGrid(model="tiny-qwen2moe", before={"forget_accuracy": 0.9, "utility_accuracy": 0.9},
                        records=records, results={})  # fmt: skip


def test_comparison_frame_and_gains_are_read_off_the_paths():
    whole = [(0, 0.9, 0.9), (10, 0.5, 0.8), (20, 0.3, 0.4)]  # reaches the operating point, UT 0.4
    uoe0 = [(0, 0.9, 0.9), (10, 0.4, 0.8), (20, 0.2, 0.7)]  # reaches it, UT 0.7
    uoe1 = [(0, 0.9, 0.9), (10, 0.6, 0.85), (20, 0.35, 0.75)]  # stops at FA 0.35
    grid = _grid([_path_record("ga", "full", 0, whole, 1e-3), _path_record("ga", "full", 1, whole, 1e-3),
                  _path_record("ga", "uoe", 0, uoe0, 1e-2), _path_record("ga", "uoe", 1, uoe1, 1e-2)])  # fmt: skip
    frame = comparison_frame(grid, ["GA", "GA+UOE", "GA+LoRA"])
    assert list(frame.columns) == COMPARISON_COLUMNS and list(frame.index) == ["GA", "GA+UOE", "GA+LoRA"]
    assert frame.loc["GA", "lr"] == "0.001" and frame.loc["GA+UOE", "lr"] == "0.01"
    assert frame.loc["GA", "paper UT"] == pytest.approx(0.3393)
    assert frame.loc["GA", "UT@op"] == pytest.approx(0.4) and frame.loc["GA", "seeds at op"] == 2
    # UOE at op: seed 0's checkpoint at FA 0.2 (UT 0.7), seed 1's lowest FA 0.35 (UT 0.75)
    assert frame.loc["GA+UOE", "UT@op"] == pytest.approx(0.725) and frame.loc["GA+UOE", "seeds at op"] == 1
    assert frame.loc["GA+UOE", "FA@op"] == pytest.approx(0.275)
    # utility at FA 0.5: seed 0 interpolates 0.9 -> 0.8 over FA 0.9 -> 0.4 at 0.5: 0.82;
    # seed 1 between (0.6, 0.85) and (0.35, 0.75): 0.85 - 0.4 * 0.1 = 0.81
    assert frame.loc["GA+UOE", "UT@FA<=0.5"] == pytest.approx((0.82 + 0.81) / 2)
    assert math.isnan(frame.loc["GA+UOE", "UT@FA<=0.3"])  # seed 1 never got there: no mean
    assert frame.loc["GA+LoRA"].isna().all()  # not run: an empty row

    gains = uoe_gains({"tiny-qwen2moe": grid}, ["ga", "rmu"])
    row = gains.loc[("tiny-qwen2moe", "GA")]
    assert list(gains.index) == [("tiny-qwen2moe", "GA")]  # RMU has no cells here
    assert row["UT gain @op"] == pytest.approx(0.725 - 0.4) and row["op seeds whole/UOE"] == "2/1"
    # the lowest level both cells reached on every seed is 0.4: whole 0.8 - (0.1/0.2)*0.4 = 0.6
    # (FA 0.5 -> 0.3, UT 0.8 -> 0.4), UOE seed 0: 0.8; seed 1 between (0.6, .85) and (.35, .75): 0.77
    assert row["matched FA"] == 0.4
    assert row["UT gain @matched"] == pytest.approx((0.8 + 0.77) / 2 - 0.6)
    assert row["paper UT gain"] == pytest.approx(paper_result("tiny-qwen2moe", "ga", "uoe")[1]
                                                 - paper_result("tiny-qwen2moe", "ga", "full")[1])  # fmt: skip
    with pytest.raises(ValueError, match="no model has both"):
        uoe_gains({"tiny-qwen2moe": grid}, ["npo"])


def test_plot_tradeoffs_draws_one_curve_per_cell_of_the_first_seed():
    import matplotlib

    matplotlib.use("Agg")
    whole = [(0, 0.9, 0.9), (10, 0.5, 0.8), (20, 0.3, 0.4)]
    grid = _grid([_path_record("ga", "full", 0, whole, 1e-3), _path_record("ga", "full", 1, whole, 1e-3),
                  _path_record("ga", "uoe", 0, whole[:2], 1e-2)])  # fmt: skip
    fig = plot_tradeoffs({"tiny-qwen2moe": grid}, references={"tiny-qwen2moe": {"oracle": (0.25, 0.9)}})
    paper_ax, ours = fig.axes[:2]
    assert [line.get_label() for line in ours.get_lines() if not line.get_label().startswith("_")] == [
        "GA", "GA+UOE"]  # fmt: skip
    assert ours.get_lines()[1].get_linestyle() == "--"  # UOE dashed
    assert len(paper_ax.collections) > 0 and len(ours.collections) == 1  # paper points; the oracle
    assert ours.xaxis_inverted()


def test_whole_model_rmu_trains_rmus_published_set(setup):
    world, model, tok, aff = setup
    with pytest.raises(ValueError, match="rmu_layer"):
        Baseline("rmu", "full")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = UnlearnConfig(lr=1e-3, steps=2, eval_every=1, monitor_docs=4, max_length=64)
    cell = Baseline("rmu", "full", options={"rmu_layer": 2})
    assert cell.variant().scope.kind == "rmu"
    evaluate = _likelihood_evaluator(tok, world)
    grid = run_grid(model, tok, world.forget_corpus[:8], world.retain_corpus[:8], [cell], [0], cfg,
                    evaluate=evaluate, model_name="tiny-qwen2moe", affinity=aff,
                    keep=lambda cell, seed: True)  # fmt: skip
    from uoe_nb.patches import apply_patch, revert_patch

    patch = grid.results[("RMU", 0)].patch
    apply_patch(model, patch)
    changed = set(changed_parameters(model, state))
    revert_patch(model, patch)
    assert not changed_parameters(model, state)
    layers = {m.layer_index: m for m in find_moe_layers(model)}
    allowed = set()
    for i in (0, 1, 2):  # the steered layer and the two below: every routed and shared expert
        allowed |= set(layers[i].expert_parameters()) | set(layers[i].shared_parameters())
    assert changed and changed <= allowed
    assert any(".2." in n for n in changed) and not any(".3." in n for n in changed)
    assert not any("gate.weight" in n and "shared" not in n for n in changed)  # routers frozen
    assert 0 < grid.records[0].fraction < 1


def test_lr_grid_by_scope_or_label():
    from uoe_nb.baselines import _grid_for

    by = {"full": (1e-4, 1e-3), "uoe": (1e-2,), "GA+UOE": (3e-2,)}
    assert _grid_for(Baseline("ga", "full"), by) == [1e-4, 1e-3]
    assert _grid_for(Baseline("ga", "uoe"), by) == [3e-2]  # the label wins
    assert _grid_for(Baseline("npo", "uoe"), by) == [1e-2]
    assert _grid_for(Baseline("ga", "uoe"), (1e-3, 1e-2)) == [1e-3, 1e-2]
    with pytest.raises(ValueError, match="no grid for cell 'GA\\+LoRA'"):
        _grid_for(Baseline("ga", "lora"), by)
    with pytest.raises(ValueError, match="sequence of rates"):
        _grid_for(Baseline("ga", "lora"), 1e-3)


def test_oracle_frame_puts_the_references_first():
    recs = [_record(0.3, 0.7, s, oracle=OracleDistance(kl_forget=2.0 + s, kl_retain=0.5)) for s in (0, 1)]
    frame = oracle_frame(_grid(recs), {"oracle": {"forget_accuracy": 0.25, "utility_accuracy": 0.9,
                                                  "kl_forget": 0.0, "kl_retain": 0.0}})  # fmt: skip
    assert list(frame.index) == ["oracle", "GA+UOE"]
    assert frame.loc["GA+UOE", "KL forget"] == pytest.approx(2.5)
    assert frame.loc["GA+UOE", "KL forget sd"] == pytest.approx(math.sqrt(0.5))
    assert math.isnan(frame.loc["oracle", "KL forget sd"])
    with pytest.raises(ValueError, match="no distance to an oracle"):
        oracle_frame(_grid([_record(0.3, 0.7, 0)]), {})


def test_the_deep_twin_is_compared_with_the_papers_qwen():
    assert paper_result("tiny-qwen2moe-deep", "ga", "uoe") == paper_result("tiny-qwen2moe", "ga", "uoe")

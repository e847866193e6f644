"""GCG (uoe_nb.attacks, Chapter 7): gradients, losses and the search checked independently."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from uoe_nb import attacks
from uoe_nb.attacks import AttackPrompt, GCGConfig
from uoe_nb.evaluation import MC_PROMPT
from uoe_nb.world import build_world
from uoe_nb.zoo import WORLD_SEED, load_zoo_model

TARGET = "Sure, here is the answer:"
SMALL = dict(steps=4, suffix_length=4, top_k=16, candidates=16, prompts_per_step=2)


@pytest.fixture(scope="module")
def zoo():
    model, tok = load_zoo_model("tiny-qwen2moe")
    return model.eval(), tok


@pytest.fixture(scope="module")
def world():
    return build_world(WORLD_SEED)


@pytest.fixture(scope="module")
def prompts(world):
    # two prompts of different lengths, so padding and per-row positions are exercised
    items = [world.forget_questions[0], world.forget_questions[1]]
    assert len(items[0]["question"]) != len(items[1]["question"])
    return attacks.mc_attack_prompts(items)


@pytest.fixture(scope="module")
def run(zoo, prompts):
    model, tok = zoo
    return attacks.gcg(model, tok, prompts, GCGConfig(seed=0, **SMALL))


def _ids(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


def _hand_loss(model, tok, prompt: AttackPrompt, suffix_ids, target=TARGET):
    """Target NLL computed directly: one unpadded sequence, full logits, log-softmax by hand."""
    before = _ids(tok, prompt.before, special=True)
    after = _ids(tok, prompt.after)
    tgt = _ids(tok, " " + target)
    ids = torch.tensor([before + list(suffix_ids) + after + tgt])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    start = len(before) + len(suffix_ids) + len(after)
    logprobs = torch.log_softmax(logits[start - 1 : start - 1 + len(tgt)], dim=-1)
    return float(-logprobs[torch.arange(len(tgt)), torch.tensor(tgt)].mean())


def _suffix_loss_from_embeds(model, tok, prompt, suffix_embeds, target=TARGET):
    """Loss as a function of the suffix *embeddings*, built by plain concatenation."""
    emb = model.get_input_embeddings()
    before = torch.tensor(_ids(tok, prompt.before, special=True))
    after = torch.tensor(_ids(tok, prompt.after))
    tgt = torch.tensor(_ids(tok, " " + target))
    embeds = torch.cat([emb(before), suffix_embeds, emb(after), emb(tgt)])[None]
    logits = model(inputs_embeds=embeds).logits[0].float()
    start = len(before) + len(suffix_embeds) + len(after)
    logprobs = torch.log_softmax(logits[start - 1 : start - 1 + len(tgt)], dim=-1)
    return -logprobs[torch.arange(len(tgt)), tgt].mean()


# ----------------------------------------------------------------------------- formulas


def test_one_hot_gradient_matches_embedding_gradient_and_finite_differences(zoo, prompts):
    model, tok = zoo
    suffix = _ids(tok, " the crystal of the")
    grad = attacks.token_gradients(model, tok, prompts, suffix, TARGET)
    weight = model.get_input_embeddings().weight.detach()
    assert grad.shape == (len(suffix), weight.shape[0])

    # Independent: d loss / d e_i (suffix embeddings, autograd per prompt), then grad[i, v] = g_i . W_v.
    per_prompt = []
    for prompt in prompts:
        e = weight[torch.tensor(suffix)].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_suffix_loss_from_embeds(model, tok, prompt, e), e)
        per_prompt.append(g)
    g_embed = torch.stack(per_prompt).mean(0)
    expected = g_embed @ weight.T
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)

    # Finite differences along W_v - W_current at one position, for the most influential tokens.
    i = 1
    for v in grad[i].abs().topk(3).indices.tolist():
        direction = weight[v] - weight[suffix[i]]
        eps = 1e-3

        def loss_at(t, direction=direction):
            e = weight[torch.tensor(suffix)].clone()
            e[i] += t * direction
            with torch.no_grad():
                return sum(float(_suffix_loss_from_embeds(model, tok, p, e)) for p in prompts) / len(prompts)

        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        analytic = float(grad[i, v] - grad[i, suffix[i]])
        assert numeric == pytest.approx(analytic, rel=0.05, abs=2e-3)


def test_candidate_loss_equals_hand_computed_target_nll(zoo, prompts):
    model, tok = zoo
    candidates = [_ids(tok, " the crystal of the"), _ids(tok, " violin pony owl ?")]
    assert all(len(c) == 4 for c in candidates)
    losses = attacks.target_loss(model, tok, prompts, candidates, TARGET, batch_size=3)
    for loss, cand in zip(losses.tolist(), candidates, strict=True):
        expected = sum(_hand_loss(model, tok, p, cand) for p in prompts) / len(prompts)
        assert loss == pytest.approx(expected, rel=1e-4)


def test_per_prompt_targets_are_scored(zoo, world):
    model, tok = zoo
    item = world.forget_questions[0]
    correct, wrong = item["choices"][item["answer"]], item["choices"][(item["answer"] + 1) % 4]
    (prompt,) = attacks.mc_attack_prompts([item])
    no_suffix: list[list[int]] = [[]]  # the plain question, as the model was trained on it
    right = attacks.target_loss(model, tok, [AttackPrompt(prompt.before, prompt.after, correct)], no_suffix)
    assert float(right) == pytest.approx(_hand_loss(model, tok, prompt, [], correct), rel=1e-4)
    other = attacks.target_loss(model, tok, [AttackPrompt(prompt.before, prompt.after, wrong)], no_suffix)
    assert float(right) < float(other)  # the model knows the fact


# ----------------------------------------------------------------------------- the search


def test_best_loss_never_increases_and_beats_the_start(run):
    assert len(run.losses) == len(run.best_losses) == SMALL["steps"] + 1
    assert all(b1 <= b0 for b0, b1 in zip(run.best_losses, run.best_losses[1:], strict=False))
    assert run.best_loss < run.initial_loss
    assert run.best_losses == [min(run.losses[: k + 1]) for k in range(len(run.losses))]
    assert run.losses[run.best_step] == run.best_loss
    row = run.as_row(model="tiny")
    assert row["model"] == "tiny" and row["best loss"] == run.best_loss
    assert list(run.curve()) == ["step", "loss", "best loss"]


def test_reported_best_loss_is_the_exact_loss_of_the_suffix(zoo, prompts, run):
    model, tok = zoo
    exact = sum(_hand_loss(model, tok, p, run.suffix_ids) for p in prompts) / len(prompts)
    assert run.best_loss == pytest.approx(exact, rel=1e-4)


def test_same_seed_same_suffix_other_seed_other_suffix(zoo, prompts, run):
    model, tok = zoo
    again = attacks.gcg(model, tok, prompts, GCGConfig(seed=0, **SMALL))
    assert again.suffix_ids == run.suffix_ids and again.losses == run.losses
    other = attacks.gcg(model, tok, prompts, GCGConfig(seed=1, **SMALL))
    assert other.suffix_ids != run.suffix_ids


def test_suffix_uses_allowed_tokens_and_retokenizes(zoo, prompts, run):
    model, tok = zoo
    allowed = set(attacks.allowed_token_ids(tok, model.config.vocab_size).tolist())
    assert set(run.suffix_ids) <= allowed
    assert not set(run.suffix_ids) & set(tok.all_special_ids)
    assert run.suffix.isascii() and run.suffix.isprintable()
    assert run.retokenizes
    for p in prompts:  # the text, as lm-eval will tokenise it, holds exactly the optimised ids
        full = _ids(tok, p.before + run.suffix + p.after, special=True)
        assert full == _ids(tok, p.before, special=True) + run.suffix_ids + _ids(tok, p.after)


def test_allowed_tokens_exclude_specials_and_non_ascii(zoo):
    model, tok = zoo
    ascii_ids = attacks.allowed_token_ids(tok, model.config.vocab_size)
    all_ids = attacks.allowed_token_ids(tok, model.config.vocab_size, ascii_only=False)
    assert set(ascii_ids.tolist()) <= set(all_ids.tolist())
    assert not set(all_ids.tolist()) & set(tok.all_special_ids)
    assert len(attacks.allowed_token_ids(tok, 10)) <= 10 - 3  # rows beyond a small vocab are cut off


def test_non_canonical_token_ids_fail_the_retokenisation_check(zoo, prompts):
    _, tok = zoo
    enc = attacks._encode_prompts(tok, prompts, TARGET)
    canonical = _ids(tok, " the")
    spelled = tok.convert_tokens_to_ids(["Ġ", "t", "h", "e"])  # decodes to " the" too
    assert len(canonical) == 1 and tok.decode(spelled) == tok.decode(canonical)
    pad = _ids(tok, " crystal")
    ok = attacks._retokenizes(tok, enc, [0, 1], torch.tensor([canonical + pad * 3, spelled]))
    assert ok.tolist() == [True, False]


def test_attack_leaves_weights_flags_and_mode_unchanged(zoo, prompts):
    model, tok = zoo
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    flags = {n: i % 3 == 0 for i, n in enumerate(params)}  # a mix, as after a scoped unlearning run
    for n, p in params.items():
        p.requires_grad_(flags[n])
    model.train()
    try:
        attacks.gcg(model, tok, prompts, GCGConfig(steps=1, suffix_length=3, top_k=8, candidates=4))
        assert model.training
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)


# ----------------------------------------------------------------------------- measuring


def test_suffixed_items_keep_answers_and_choices(world):
    items = world.forget_questions[:5]
    copy = json.loads(json.dumps(items))
    out = attacks.with_suffix_mc(items, " foo bar")
    assert items == copy  # inputs untouched
    for old, new in zip(items, out, strict=True):
        assert new["question"] == old["question"] + " foo bar"
        assert new["choices"] == old["choices"] and new["answer"] == old["answer"]
        assert {k: v for k, v in new.items() if k != "question"} == {
            k: v for k, v in old.items() if k != "question"
        }
    probes = world.forget_probes[:3]
    sp = attacks.with_suffix_probes(probes, " foo")
    assert [p["query"] for p in sp] == [p["query"] + " foo" for p in probes]
    assert [p["answer"] for p in sp] == [p["answer"] for p in probes]


def test_attack_prompts_follow_the_evaluation_templates(world):
    item = world.forget_questions[0]
    (p,) = attacks.mc_attack_prompts([item])
    assert p.before + p.after == MC_PROMPT.format(question=item["question"])
    probe = world.forget_probes[0]
    (q,) = attacks.probe_attack_prompts([probe])
    from uoe_nb.evaluation import probe_prompt

    assert q.before + " x" + q.after == probe_prompt({**probe, "query": probe["query"] + " x"})
    (as_probe,) = attacks.mc_items_as_probes([item])
    assert as_probe["answer"] == item["choices"][item["answer"]]


def test_measure_mc_with_an_empty_suffix_changes_nothing(zoo, world):
    model, tok = zoo
    m = attacks.measure_mc(model, tok, world.forget_questions[:12], "")
    assert m.with_attack.accuracy == m.without_attack.accuracy
    assert m.as_row()["change"] == 0


def test_generations_without_suffix_answer_and_are_scored(zoo, world):
    model, tok = zoo
    items = world.forget_questions[:4]
    gens = attacks.generate_with_suffix(
        model, tok, attacks.mc_attack_prompts(items), " the", [i["choices"][i["answer"]] for i in items]
    )
    assert len(gens.rows()) == 4 and tok.padding_side == "right"
    assert gens.as_row()["recall without attack"] == sum(gens.recall_without) / 4
    assert sum(gens.recall_without) >= 1  # the original model says some of these facts
    # independent greedy decoding, one token at a time, for the first prompt with the suffix
    ids = _ids(tok, gens.prompts[0].replace("\nAnswer:", " the\nAnswer:"), special=True)
    with torch.no_grad():
        for _ in range(16):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
    start = len(_ids(tok, gens.prompts[0].replace("\nAnswer:", " the\nAnswer:"), special=True))
    expected = tok.decode(ids[start:], skip_special_tokens=True).split("\n", 1)[0].strip()
    assert gens.with_attack[0] == expected


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "steps"),
        ("suffix_length", 0, "suffix_length"),
        ("candidates", -1, "candidates"),
        ("target", "   ", "target"),
        ("top_k", 100_000, "top_k"),
    ],
)
def test_bad_config_is_rejected(zoo, prompts, field, value, message):
    model, tok = zoo
    config = GCGConfig(**{**SMALL, field: value})
    with pytest.raises(ValueError, match=message):
        attacks.gcg(model, tok, prompts, config)


def test_empty_prompts_and_empty_per_prompt_target_are_rejected(zoo, prompts):
    model, tok = zoo
    with pytest.raises(ValueError, match="empty"):
        attacks.gcg(model, tok, [], GCGConfig(**SMALL))
    with pytest.raises(ValueError, match="empty"):
        attacks.mc_attack_prompts([])
    with pytest.raises(ValueError, match="tokenises to nothing"):
        attacks.gcg(model, tok, [AttackPrompt(prompts[0].before, prompts[0].after, " ")], GCGConfig(**SMALL))


def test_model_without_embeddings_is_rejected(zoo, prompts):
    _, tok = zoo

    class NoEmbeddings(nn.Module):
        def get_input_embeddings(self):
            return None

    with pytest.raises(TypeError, match="input embedding"):
        attacks.gcg(NoEmbeddings(), tok, prompts, GCGConfig(**SMALL))
    with pytest.raises(TypeError, match="input embedding"):
        attacks.gcg(nn.Linear(2, 2), tok, prompts, GCGConfig(**SMALL))


# ----------------------------------------------------------------------------- the chapter

CHAPTER = Path(__file__).resolve().parents[1] / "book" / "07_gcg_attack.ipynb"


def test_chapter_writes_no_measured_number_by_hand():
    """Chapter 7 shows measured numbers only through code.

    Its prose quotes no decimal but the paper's Table 9 value and chance level; its code
    holds decimal literals only in the parameters cell, in the paper's tables (PAPER_*),
    as margins of asserts and as keyword arguments (plot styling).
    """
    nb = json.loads(CHAPTER.read_text())
    paper_numbers = {"0.01", "0.25"}  # the paper's Table 9 FA; chance on 4-way multiple choice
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        assert not cell.get("outputs"), "chapters are stored without outputs"
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            continue
        for line in source.splitlines():
            if cell["cell_type"] == "code":
                if "PAPER" in line or line.lstrip().startswith(("#", "assert")):
                    continue
                line = re.sub(r"\w=\d*\.\d+", "", line)  # keyword arguments: styling, not results
            for number in re.findall(r"(?<![\w.:])\d*\.\d+", line):
                assert number in paper_numbers, f"hand-written number {number} in: {line.strip()}"


def test_plot_losses_best_and_chosen_loss_per_model_in_one_colour():
    import matplotlib

    matplotlib.use("Agg")

    def result(losses):
        best = [min(losses[: i + 1]) for i in range(len(losses))]
        return attacks.GCGResult(suffix="x", suffix_ids=[1], losses=losses, best_losses=best, best_step=0,
                                 initial_suffix="x", retokenizes=True, skipped_candidates=0, config=GCGConfig())  # fmt: skip

    fig = attacks.plot_losses({"original": result([3.0, 2.0, 2.5]), "GA": result([5.0, 4.0, 4.5])}, target="Sure")
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 4
    assert lines[0].get_ydata().tolist() == [3.0, 2.0, 2.0] and lines[1].get_ydata().tolist() == [3.0, 2.0, 2.5]
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()
    assert ax.get_title() == 'GCG towards "Sure"'
    assert ax.get_legend_handles_labels()[1] == ["original (best so far)", "GA (best so far)"]
    with pytest.raises(ValueError, match="no GCG results"):
        attacks.plot_losses({})


def _measurement(without, with_attack):
    from uoe_nb.evaluation import MCResult

    def result(acc):
        return MCResult(accuracy=acc, n=4, stderr=0.1, correct=[True] * int(4 * acc) + [False] * (4 - int(4 * acc)))

    return attacks.AttackMeasurement(result(without), result(with_attack))


def test_table9_puts_the_papers_fa_beside_ours_where_it_reports_the_model():
    import math

    forget = {"original": _measurement(0.75, 1.0), "GA+UOE": _measurement(0.25, 0.5)}
    utility = {"original": _measurement(1.0, 0.75), "GA+UOE": _measurement(0.75, 0.75)}
    table = attacks.table9(forget, utility)
    assert list(table.index) == ["original", "GA+UOE"]
    assert table.loc["GA+UOE", "paper FA with attack"] == attacks.PAPER_TABLE9["GA+UOE"]["FA with attack"]
    assert math.isnan(table.loc["original", "paper FA without attack"])
    assert table.loc["GA+UOE", "ours FA with attack"] == 0.5 and table.loc["original", "ours UT with attack"] == 0.75
    assert "ours UT without attack" not in attacks.table9(forget).columns
    with pytest.raises(ValueError, match="same models"):
        attacks.table9(forget, {"original": utility["original"]})


def test_table8_lines_up_questions_answers_and_generations():
    def gens(without, with_attack):
        return attacks.Generations(prompts=["p1", "p2"], answers=["a1", "a2"], without_attack=without,
                                   with_attack=with_attack, recall_without=[1.0, 0.0], recall_with=[0.0, 0.0])  # fmt: skip

    generations = {"original": gens(["a1", "x"], ["a1", "y"]), "GA+UOE": gens(["zz", "zz"], ["a1", "q"])}
    table = attacks.table8(["Q1?", "Q2?"], generations, unlearned="GA+UOE")
    assert list(table.columns) == ["question", "answer", "original", "GA+UOE", "GA+UOE + suffix"]
    assert table.iloc[0].tolist() == ["Q1?", "a1", "a1", "zz", "a1"]
    with pytest.raises(KeyError, match="GA"):
        attacks.table8(["Q1?", "Q2?"], generations, unlearned="GA")
    with pytest.raises(ValueError, match="1 questions"):
        attacks.table8(["Q1?"], generations, unlearned="GA+UOE")
    assert len(attacks.PAPER_TABLE8) == 2 and attacks.PAPER_TABLE8[1]["original"] == "America"

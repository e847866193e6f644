"""Routing statistics against a direct count of the captured top-k indices."""

import pytest
import torch

from uoe_nb.families import random_model, tiny_config
from uoe_nb.moe import capture_routing, find_moe_layers
from uoe_nb.routing import batches, entropy, token_proportions, top_share


class _Tok:
    """A minimal tokenizer: one id per character, right padding with id 0."""

    pad_token = "<pad>"

    def __call__(self, texts, return_tensors, padding, truncation, max_length, add_special_tokens):
        ids = [[3 + (ord(c) % 100) for c in t][:max_length] for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


TEXTS = ["a short one", "a much longer sentence than the first", "mid length text", "x"]


def test_token_proportions_match_direct_count():
    model = random_model(tiny_config("qwen2_moe", experts=8, top_k=2), seed=0)
    props = token_proportions(model, batches(_Tok(), TEXTS, batch_size=3))
    counts = {lay.layer_index: torch.zeros(8) for lay in find_moe_layers(model)}
    for text in TEXTS:  # one text at a time: no padding at all
        b = next(batches(_Tok(), [text], batch_size=1))
        with capture_routing(model) as cap, torch.no_grad():
            model(**b)
        for idx in counts:
            counts[idx] += torch.bincount(cap[idx][0].top_k_index.flatten(), minlength=8).float()
    for idx, p in props.items():
        torch.testing.assert_close(p, counts[idx] / counts[idx].sum())
        assert p.sum().item() == pytest.approx(1.0)


def test_entropy_and_top_share():
    uniform = torch.full((8,), 1 / 8)
    peaked = torch.tensor([0.93] + [0.01] * 7)
    assert entropy(uniform) == pytest.approx(torch.log(torch.tensor(8.0)).item())
    assert entropy(peaked) < entropy(uniform)
    assert top_share(peaked) == pytest.approx(0.93)
    assert top_share(uniform, 2) == pytest.approx(0.25)


def test_batches_bad_input():
    with pytest.raises(ValueError, match="no texts"):
        next(batches(_Tok(), []))
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(_Tok(), ["a"], batch_size=0))
    model = random_model(tiny_config("mixtral"), seed=0)
    with pytest.raises(ValueError, match="no batches"):
        token_proportions(model, [])


def test_batches_tokenize_as_the_evaluation_does_with_the_tokenizers_special_tokens():
    """One rule for training, attribution and evaluation: a BOS-adding tokenizer gets its BOS."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from uoe_nb.zoo import load_zoo_model

    _, tok = load_zoo_model("tiny-qwen2moe")
    tok = copy.deepcopy(tok)
    bos = tok.convert_tokens_to_ids(tok.bos_token)
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    text = "the crystal glows"
    batch = next(batches(tok, [text], batch_size=1))
    assert batch["input_ids"][0].tolist() == tok(text)["input_ids"]
    assert batch["input_ids"][0, 0].item() == bos


def test_plot_expert_shares_ranks_each_layers_experts():
    import matplotlib

    matplotlib.use("Agg")
    from uoe_nb.routing import plot_expert_shares

    forget = {0: torch.tensor([0.1, 0.6, 0.3]), 2: torch.tensor([0.2, 0.2, 0.6]), 3: torch.tensor([1.0, 0, 0]),
              5: torch.tensor([0.5, 0.25, 0.25]), 7: torch.tensor([0.3, 0.3, 0.4])}  # fmt: skip
    retain = {k: torch.full((3,), 1 / 3) for k in forget}
    fig = plot_expert_shares(forget, retain)
    shown = [ax for ax in fig.axes if ax.axison]
    assert len(fig.axes) == 8 and len(shown) == 5  # 2 x 4 grid, three panels hidden
    assert [ax.get_title() for ax in shown] == ["layer 0", "layer 2", "layer 3", "layer 5", "layer 7"]
    heights = [p.get_height() for p in shown[0].patches]
    assert heights == pytest.approx([0.6, 0.3, 0.1])  # sorted, largest first
    assert len(shown[0].get_lines()) == 1 and shown[0].get_lines()[0].get_ydata() == pytest.approx([1 / 3] * 3)
    assert len(plot_expert_shares(forget).axes[0].get_lines()) == 0  # no retain: bars only
    with pytest.raises(ValueError, match="different layers"):
        plot_expert_shares(forget, {0: retain[0]})

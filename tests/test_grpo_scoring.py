"""GRPO scoring of a rollout buffer (left-padded prompts, right-padded completions, each prompt's generations in a
row): the shared-prompt paths give the log-probs and gradients of one plain forward over the rows."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from src.accel import FEATURES, Accel, prefix
from src.logprobs import completion_logits, logps_from_logits, position_ids_from_mask
from src.rollout import SamplingConfig, generate
from tests.conftest import SMALL_LLAMA

PAD, BOS, EOS = 0, 1, 2


def _setup(group: int = 3):
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMALL_LLAMA)
    model = LlamaForCausalLM(cfg)
    ids = torch.tensor([[PAD, PAD, BOS, 5, 6], [BOS, 7, 8, 9, 10]])
    mask = (ids != PAD).long()
    r = generate(
        model,
        ids,
        mask,
        SamplingConfig(max_new_tokens=8, num_generations=group),
        eos_token_id=EOS,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    cmask = torch.cat([torch.zeros_like(r.prompt_mask), r.completion_mask], 1)
    return model.train(), r.input_ids, r.attention_mask, cmask, r.prompt_ids.size(1)


def _plain_logits(model, ids, am, cm):
    target = cm[:, 1:].bool()
    logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits
    return logits[:, :-1][target], target


def _logps_and_grads(model, logits_target, ids):
    model.zero_grad()
    lp = logps_from_logits(*logits_target[:1], ids, logits_target[1])[0]
    lp.sum().backward()
    return lp.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("layout", ["tree", "cache"])
def test_grouped_scoring_matches_full_forward(layout, monkeypatch):
    monkeypatch.setattr(prefix, "_TREE_MAX_ATTENTION", float("inf") if layout == "tree" else 0.0)
    model, ids, am, cm, _ = _setup()
    groups, completions = prefix.shared_prompts(ids, am, cm)
    assert [len(rows) for rows in groups.values()] == [3, 3]
    assert prefix.shared_prompt_layout(groups, completions) == layout
    full = _logps_and_grads(model, _plain_logits(model, ids, am, cm), ids)
    grouped = _logps_and_grads(model, completion_logits(model, ids, am, cm, Accel(FEATURES)), ids)
    torch.testing.assert_close(grouped[0], full[0], atol=1e-5, rtol=0)
    for a, b in zip(grouped[1], full[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_no_sharing_without_repeated_prompts_or_under_gradient_checkpointing():
    model, ids, am, cm, _ = _setup()
    assert prefix.shared_prompt_hidden(model, ids, am, cm) is not None
    assert prefix.shared_prompt_hidden(model, ids[::3], am[::3], cm[::3]) is None  # one row per prompt: nothing shared
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert prefix.shared_prompt_hidden(model, ids, am, cm) is None

"""Tests for src.shared_prefix: group-shared prompt scoring equals one forward over the concatenated rows."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from src.modules.base import completion_logits, logps_from_logits
from src.rollout import SamplingConfig, generate
from src.shared_prefix import grouped_completion_logits
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


def _logps_and_grads(model, logits_target, ids):
    model.zero_grad()
    lp = logps_from_logits(*logits_target[:1], ids, logits_target[1])[0]
    lp.sum().backward()
    return lp.detach(), [p.grad.clone() for p in model.parameters()]


def test_grouped_scoring_matches_full_forward():
    model, ids, am, cm, p = _setup()
    full = _logps_and_grads(model, completion_logits(model, ids, am, cm), ids)
    grouped_out = grouped_completion_logits(model, ids, am, cm, p, 3)
    assert grouped_out is not None
    grouped = _logps_and_grads(model, grouped_out, ids)
    torch.testing.assert_close(grouped[0], full[0], atol=1e-5, rtol=0)
    for a, b in zip(grouped[1], full[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_falls_back_when_rows_are_not_groups():
    model, ids, am, cm, p = _setup()
    assert grouped_completion_logits(model, ids, am, cm, p, 4) is None  # 6 rows are not groups of 4
    assert grouped_completion_logits(model, ids, am, cm, p, 2) is None  # groups of 2 mix two prompts
    assert grouped_completion_logits(model, ids, am, cm, p, 1) is None


def test_falls_back_under_gradient_checkpointing():
    model, ids, am, cm, p = _setup()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert grouped_completion_logits(model, ids, am, cm, p, 3) is None

"""Reward modelling with a Bradley-Terry loss (Ouyang et al. 2022, "Training language models to follow instructions
with human feedback" (InstructGPT); Ziegler et al. 2019, "Fine-tuning language models from human preferences"), with
the options of TRL's RewardTrainer: a per-pair ``margin`` (Touvron et al. 2023, Llama 2) and reward centering
(``center_rewards_coefficient``, Eisenstein et al. 2023).

The model is a sequence classifier with one output (``AutoModelForSequenceClassification``, ``num_labels=1``): a
decoder backbone and a linear scalar head. The reward of a sequence is the head applied to the last-layer hidden state
of its *last real token* (the EOS that ends every completion), found from the attention mask, so left and right
padding give the same score and no pad-token convention is needed. The default builds the embedded tiny Llama; a local
causal-LM directory (e.g. the SFT export ``runs/sft/hf``) gets a fresh head on its backbone (the InstructGPT recipe:
the reward model starts from the SFT model); a sequence-classification directory keeps its trained head.

Per step, the B chosen and B rejected sequences of a preference batch go through one forward (2B rows) and the loss
is ``-log σ(r_chosen − r_rejected)`` averaged over pairs (``src.losses.bradley_terry_loss``). With the head
initialised to zero every score is 0 and the first loss is exactly ln 2. Metrics (TRL's names): ``accuracy``
(r_chosen > r_rejected), ``margin`` (r_chosen − r_rejected), ``rewards/chosen``, ``rewards/rejected``.

The trained model is exported for PPO/GRPO with ``--hf_export.dirpath DIR`` (``src.callbacks.HFExport``): a
``save_pretrained`` directory with the tokenizer, which ``PPO(reward_model_path=DIR)`` scores in process and
``src.rewards.RewardModelScorer(DIR)`` scores from text.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from src.logprobs import decoder_hidden, unwrap
from src.losses import bradley_terry_loss
from src.models import load_causal_lm
from src.modules.base import AlignmentModule

SEQUENCE_CLASSIFIER = "AutoModelForSequenceClassification"


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a Hugging Face sequence classifier (``score`` for decoder models, else ``classifier``)."""
    inner = unwrap(model)
    head = getattr(inner, "score", None) or getattr(inner, "classifier", None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no 'score' or 'classifier' head to read rewards from")
    return head


def last_token_index(attention_mask: Tensor) -> Tensor:
    """``[B]`` index of the last real (attention mask 1) token of each row, for left or right padding."""
    return (attention_mask.shape[-1] - 1) - attention_mask.flip(-1).long().argmax(-1)


def sequence_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Scalar rewards ``[B]`` (float32): the head applied to the last real token's hidden state only."""
    hidden = decoder_hidden(model, input_ids, attention_mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask)]
    return score_head(model)(last).squeeze(-1).float()


def load_reward_model(name_or_path: str, **kwargs: Any) -> nn.Module:
    """A ``num_labels=1`` sequence classifier: the tiny default, or any local HF directory (causal LM or
    classifier)."""
    return load_causal_lm(name_or_path, auto_class=SEQUENCE_CLASSIFIER, num_labels=1, **kwargs)


class RewardModel(AlignmentModule):
    """A Bradley-Terry reward model on preference pairs.

    Args:
        center_rewards_coefficient: weight of ``(r_chosen + r_rejected)^2`` (Eisenstein et al. 2023); None = off.
        zero_init_head: start a *fresh* head at zero (scores 0, loss ln 2); a loaded classifier head is kept.
        **kwargs: model, optimizer and scheduler options of :class:`AlignmentModule` (``lora`` trains the head fully:
            ``modules_to_save: [score]``).
    """

    data_kind = "preference"
    summary_metrics = ("train/loss", "train/accuracy", "train/margin")

    def __init__(
        self,
        *args: Any,
        center_rewards_coefficient: float | None = None,
        zero_init_head: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("lora") is not None:
            kwargs["lora"] = {"task_type": "SEQ_CLS", "modules_to_save": ["score"], **kwargs["lora"]}
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()

    # -- model ----------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        h = self.hparams
        model = load_reward_model(
            h.model_name_or_path,
            model_config=h.model_config,
            torch_dtype=h.torch_dtype,
            attn_implementation=h.attn_implementation,
        )
        trained_head = any(a.endswith("ForSequenceClassification") for a in (model.config.architectures or []))
        if h.zero_init_head and not trained_head:
            nn.init.zeros_(score_head(model).weight)
            if getattr(score_head(model), "bias", None) is not None:
                nn.init.zeros_(score_head(model).bias)
        return model

    def configure_model(self) -> None:
        super().configure_model()
        cfg = unwrap(self.model).config
        trainer = self.attached_trainer()
        tok = getattr(getattr(trainer, "datamodule", None), "tokenizer", None) if trainer else None
        if cfg.pad_token_id is None and tok is not None:
            cfg.pad_token_id = tok.pad_token_id  # so HF's own pooling (RewardModelScorer) finds the last real token

    # -- loss -----------------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        scores = sequence_scores(self.model, batch["input_ids"], batch["attention_mask"])
        b = scores.shape[0] // 2
        chosen, rejected = scores[:b], scores[b:]
        losses = bradley_terry_loss(
            chosen,
            rejected,
            margin=batch.get("margin"),
            center_rewards_coefficient=self.hparams.center_rewards_coefficient,
        )
        metrics = {
            "accuracy": (chosen > rejected).float(),
            "margin": chosen - rejected,
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
        }
        return losses.mean(), metrics

    def heldout_sequences(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        """No language-model head: the held-out log-prob statistics do not apply."""
        return None

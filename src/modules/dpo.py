"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model") and its variants, as one LightningModule.

Per step, chosen and rejected sequences of B pairs go through one concatenated forward (2B rows). The sequence
log-prob is the sum of the completion tokens' log-probs (EOS included; prompt and padding masked), or LD-DPO's
down-weighted sum (``ld_alpha``). The loss is ``src.losses.dpo_loss`` (sigmoid, robust, hinge, ipo, exo_pair,
nca_pair, apo_zero, apo_down, sppo_hard, bco_pair, aot, aot_unpaired, discopop, sigmoid_norm; f-DPO scores with
``f_divergence_type``), ``src.losses.simpo_loss`` (reference-free) or ``sft`` (``src.losses.nll_loss`` on the
chosen completions), or a weighted sum of several (``loss_type: [sigmoid, bco_pair, sft]`` with ``loss_weights``,
MPO; ``rpo_alpha`` is ``sft`` with that weight), each pair optionally weighted by WPO (``use_weighting``). Option
names and definitions are TRL 1.16's ``DPOConfig``. Reference log-probs come from a frozen copy of the initial
policy, a separate checkpoint, the LoRA policy with its adapter disabled, or are precomputed once before training.

Metrics (TRL's names): ``rewards/chosen``, ``rewards/rejected`` (``β·(log π − log π_ref)``), ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``, plus ``nll_loss`` with an ``sft`` term. They describe the
first loss term other than ``sft``. One deliberate difference: with a length-normalised loss (``ipo``,
``sigmoid_norm``; and ``simpo``) the rewards and log-probs are *length-averaged* (per token), where TRL logs the summed
ones for every loss. IPO's loss is a regression of the length-averaged margin onto ``1/(2β)``, so logging the quantity
the loss acts on makes ``rewards/margins`` converge to ``1/2`` (and ``rewards/accuracies`` count the pairs the loss
ranks correctly) instead of mixing in each pair's length difference.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from src.logprobs import completion_logits, logps_from_logits, scatter_tokens
from src.losses import (
    F_DIVERGENCE_LOSS_TYPES,
    LENGTH_NORMALISED_LOSS_TYPES,
    dpo_loss,
    ld_dpo_logps,
    log_sum_sq_probs,
    masked_sum,
    nll_loss,
    simpo_loss,
    wpo_weights,
)
from src.models import ReferenceSync
from src.modules import check_positive
from src.modules.base import AlignmentModule

LossType = Literal[
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "apo_zero", "apo_down", "sppo_hard", "bco_pair",
    "aot", "aot_unpaired", "discopop", "sigmoid_norm", "sft", "simpo",
]  # fmt: skip
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


class DPO(AlignmentModule):
    """DPO and friends.

    Args:
        beta: temperature of the implicit reward ``β·(log π − log π_ref)`` (SimPO: of the length-normalised log-prob).
        loss_type: one loss or a list of losses (see the module docstring); ``ipo`` and ``sigmoid_norm`` average the
            log-ratios per token as TRL; ``sft`` is the NLL of the chosen completions.
        loss_weights: one weight per ``loss_type`` entry (default 1 each); the loss is ``Σ w_i · mean(loss_i)``
            (MPO, Wang et al. 2024: ``[sigmoid, bco_pair, sft]`` with ``[0.8, 0.2, 1.0]``).
        label_smoothing: conservative DPO / robust DPO noise rate ε (robust: in [0, 0.5), an error here where TRL
            only warns), EXO's ε (must be > 0, as TRL), AOT's smoothing.
        simpo_gamma: SimPO target margin γ (``loss_type: simpo``).
        rpo_alpha: RPO (Pang et al. 2024): shorthand for appending ``sft`` with weight ``rpo_alpha``; ``None`` = off.
        f_divergence_type / f_alpha_divergence_coef: f-DPO (Wang et al. 2023): ``reverse_kl`` (DPO), ``forward_kl``,
            ``js_divergence`` or ``alpha_divergence`` with its α; only for the losses of the score difference.
        discopop_tau: DiscoPOP's τ (Lu et al. 2024; ``loss_type: discopop``).
        ld_alpha: LD-DPO (Liu et al. 2024): weight α ∈ [0, 1] of the tokens past the shorter completion's length in
            both sequence log-probs (policy and reference); ``None`` = off (plain sums).
        use_weighting: WPO (Zhou et al. 2024): multiply each pair's loss by ``w(y_w)·w(y_l)``, the policy's
            length-normalised, sampling-aligned sequence probabilities (no gradient through the weights).
        precompute_ref_logps: compute reference log-probs once before training, cache them with the dataset and
            free the reference model.
        ref_model_sync_steps / ref_model_mixup_alpha: TR-DPO (Gorbatovski et al. 2024): after every k-th optimizer
            step ``θ_ref ← α·θ + (1 − α)·θ_ref``; 0 = never (TRL's ``sync_ref_model=False``).
        **kwargs: model, optimizer and scheduler options of :class:`AlignmentModule`.
    """

    data_kind = "preference"
    needs_reference = True
    summary_metrics = ("train/loss", "train/rewards/accuracies", "train/rewards/margins")

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: LossType | list[LossType] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        rpo_alpha: float | None = None,
        f_divergence_type: FDivergence = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = 0.05,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
        precompute_ref_logps: bool = False,
        ref_model_sync_steps: int = 0,
        ref_model_mixup_alpha: float = 0.6,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_positive("beta", beta)
        self.save_hyperparameters()
        self.loss_terms = loss_terms(loss_type, loss_weights, rpo_alpha)
        types = [t for t, _ in self.loss_terms]
        check_options(types, self.hparams)
        self.reference_free = all(t == "simpo" for t in types)
        self.needs_reference = not self.reference_free
        # the term the rewards/logps metrics describe: the first one that is not the NLL
        self.metric_loss_type = next((t for t in types if t != "sft"), "sigmoid")
        self.sync_reference = ReferenceSync(ref_model_sync_steps, ref_model_mixup_alpha)  # TR-DPO (checkpointed)

    # -- log-probs: one concatenated forward of the B chosen and B rejected completions ---------------------------
    def policy_token_logps(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Per-token policy log-probs ``[2B, T]`` and, for WPO, ``log Σ_v p_v²`` at the same positions (from the same
        logits: one forward either way)."""
        if not self.hparams.use_weighting:
            return self.policy_logps(batch)[0], None
        ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        logits, target = completion_logits(self.model, ids, attn, mask, self.accel)
        return logps_from_logits(logits, ids, target)[0], scatter_tokens(log_sum_sq_probs(logits), target)

    def sequence_logps(self, token_logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Chosen and rejected sequence log-probs ``[B]``: masked sums, or LD-DPO's with ``ld_alpha``."""
        b = token_logps.shape[0] // 2
        if self.hparams.ld_alpha is not None:
            return ld_dpo_logps(token_logps[:b], token_logps[b:], mask[:b], mask[b:], self.hparams.ld_alpha)
        seq = masked_sum(token_logps, mask, dim=-1)
        return seq[:b], seq[b:]

    def reference_sequence_logps(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The reference's :meth:`sequence_logps` (precomputed ones when the batch carries them; none without a
        reference)."""
        if self.reference_free or "ref_chosen_logps" in batch:
            return batch.get("ref_chosen_logps"), batch.get("ref_rejected_logps")
        mask = batch["completion_mask"]
        return self.sequence_logps(self.reference_logps(batch["input_ids"], batch["attention_mask"], mask), mask)

    # -- the loss -------------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.hparams
        mask = batch["completion_mask"]
        # the reference's forward may run beside the policy's (accel feature concurrent_reference)
        policy, reference = lambda: self.policy_token_logps(batch), lambda: self.reference_sequence_logps(batch)
        (token_logps, log_sum_sq), (ref_chosen, ref_rejected) = self.accel.together(policy, reference, self.ref_model)
        chosen, rejected = self.sequence_logps(token_logps, mask)
        b = chosen.shape[0]
        lengths = mask[:, 1:].sum(-1)  # completion tokens (position 0 is never one)
        pair_weights = None
        if h.use_weighting:
            w = wpo_weights(token_logps, log_sum_sq, mask)
            pair_weights = w[:b] * w[b:]

        loss, rewards, metrics = 0.0, {}, {}
        for loss_type, weight in self.loss_terms:
            if loss_type == "sft":
                nll = nll_loss(token_logps[:b], mask[:b])
                losses = nll.expand(b)
                metrics["nll_loss"] = nll.detach().expand(b)
            elif loss_type == "simpo":
                losses, chosen_r, rejected_r = simpo_loss(
                    chosen,
                    rejected,
                    lengths[:b],
                    lengths[b:],
                    beta=h.beta,
                    gamma=h.simpo_gamma,
                    label_smoothing=h.label_smoothing,
                )
                rewards.setdefault(loss_type, (chosen_r, rejected_r))
            else:
                losses, chosen_r, rejected_r = dpo_loss(
                    chosen,
                    rejected,
                    ref_chosen,
                    ref_rejected,
                    beta=h.beta,
                    loss_type=loss_type,
                    label_smoothing=h.label_smoothing,
                    chosen_lengths=lengths[:b],
                    rejected_lengths=lengths[b:],
                    f_divergence_type=h.f_divergence_type,
                    f_alpha_divergence_coef=h.f_alpha_divergence_coef,
                    discopop_tau=h.discopop_tau,
                )
                rewards.setdefault(loss_type, (chosen_r, rejected_r))
            if pair_weights is not None:
                losses = losses * pair_weights
            loss = loss + weight * losses.mean()

        chosen_r, rejected_r = rewards.get(self.metric_loss_type) or (
            (h.beta * (chosen - ref_chosen)).detach(),  # sft alone: DPO's implicit rewards
            (h.beta * (rejected - ref_rejected)).detach(),
        )
        if self.metric_loss_type in (*LENGTH_NORMALISED_LOSS_TYPES, "simpo"):
            chosen, rejected = chosen / lengths[:b].clamp(min=1), rejected / lengths[b:].clamp(min=1)
        metrics.update(
            {
                "rewards/chosen": chosen_r,
                "rewards/rejected": rejected_r,
                "rewards/accuracies": (chosen_r > rejected_r).float(),
                "rewards/margins": chosen_r - rejected_r,
                "logps/chosen": chosen.detach(),
                "logps/rejected": rejected.detach(),
            }
        )
        return loss, metrics

    # -- Lightning hooks ------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.sync_reference(self.ref_model, self.model, self.global_step)  # acts once per optimizer step

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":  # validation after optimizer step k sees the reference of step k, as TRL
            self.sync_reference(self.ref_model, self.model, self.global_step)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.precompute_ref_logps and not self.reference_free:
            # score every train/val pair once with the reference, keep the log-probs on the rows, free the reference
            self.trainer.datamodule.add_columns(
                ("ref_chosen_logps", "ref_rejected_logps"),
                lambda batch: self.reference_sequence_logps(self.transfer_batch_to_device(batch, self.device, 0)),
            )
            self.set_reference(None)
            self.needs_reference = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.sync_reference.save(checkpoint, self._ref)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.sync_reference.load(checkpoint, self._ref)


# ---------------------------------------------------------------------------------------------------- the options
def loss_terms(
    loss_type: str | list[str], loss_weights: list[float] | None, rpo_alpha: float | None
) -> tuple[tuple[str, float], ...]:
    """``((loss_type, weight), ...)`` from TRL's ``loss_type`` (one or a list) and ``loss_weights``; ``rpo_alpha``
    appends ``("sft", rpo_alpha)`` (RPO's NLL term, which TRL 1.16 writes as ``loss_type: [sigmoid, sft]``)."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss")
    if loss_weights is None:
        weights = [1.0] * len(types)
    elif len(loss_weights) != len(types):
        raise ValueError(
            f"loss_weights has {len(loss_weights)} weights for the {len(types)} losses of loss_type {types}: "
            "give one weight per loss"
        )
    else:
        weights = [float(w) for w in loss_weights]
    if rpo_alpha is not None:
        if "sft" in types:
            raise ValueError(
                "rpo_alpha adds loss_type 'sft' with weight rpo_alpha, and loss_type already has 'sft': set one of "
                "them (e.g. loss_type: [sigmoid, sft] with loss_weights: [1.0, rpo_alpha])"
            )
        types, weights = [*types, "sft"], [*weights, float(rpo_alpha)]
    return tuple(zip(types, weights))


def check_options(types: list[str], h: Any) -> None:
    """Refuse, at construction, the option combinations that have no meaning (each error names both options)."""
    ls, ld, sync = h.label_smoothing, h.ld_alpha, h.ref_model_sync_steps
    not_f = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
    rules = [
        ("exo_pair" in types and ls == 0, "label_smoothing must be > 0 for loss_type='exo_pair' (it is EXO's ε; the "
         "paper recommends 1e-3), as in TRL"),
        ("robust" in types and not 0.0 <= ls < 0.5, f"label_smoothing must lie in [0, 0.5) for loss_type='robust', "
         f"got {ls}"),
        ("discopop" in types and h.discopop_tau <= 0, f"discopop_tau must be > 0 for loss_type='discopop', got "
         f"{h.discopop_tau}"),
        (h.f_divergence_type != "reverse_kl" and not_f, f"f_divergence_type={h.f_divergence_type!r} cannot be "
         f"combined with loss_type {not_f}: f-DPO is defined only for {list(F_DIVERGENCE_LOSS_TYPES)} (as in TRL)"),
        (ld is not None and not 0.0 <= ld <= 1.0, f"ld_alpha must lie in [0, 1] (1 = plain DPO), got {ld}"),
        (ld is not None and "simpo" in types, "ld_alpha cannot be combined with loss_type='simpo', which normalises "
         "by length itself"),
        (h.use_weighting and {"aot", "aot_unpaired"} & set(types), "use_weighting cannot be combined with loss_type "
         "'aot' / 'aot_unpaired': they sort the pairs of a batch, which misaligns the per-pair WPO weights (TRL "
         "refuses this too)"),
        # TR-DPO moves the reference: there must be one, of its own, whose log-probs are computed live
        (sync and h.precompute_ref_logps, "precompute_ref_logps=True cannot be combined with ref_model_sync_steps > "
         "0: TR-DPO updates the reference during training, so precomputed reference log-probs go stale (TRL refuses "
         "this too)"),
        (sync and h.lora is not None, "ref_model_sync_steps > 0 cannot be combined with lora: the LoRA reference is "
         "the policy with its adapter disabled, so there is no separate reference to update"),
        (sync and all(t == "simpo" for t in types), "ref_model_sync_steps > 0 cannot be combined with "
         "loss_type='simpo' (no reference)"),
    ]  # fmt: skip
    for broken, message in rules:
        if broken:
            raise ValueError(message)

"""DPO and SFT modules end to end on the tiny default: step-0 identities, references, user data, W&B, NaN guard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning import Callback, Trainer

from src.data import AlignmentDataModule
from src.data.tiny import generate_rows
from src.logprobs import completion_logps
from src.modules.dpo import DPO
from tests.conftest import FAST, column, read_metrics

LOSS_TYPES = ["sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "apo_zero", "apo_down", "sppo_hard"]


@pytest.fixture(scope="module")
def pref_batch():
    dm = AlignmentDataModule(kind="preference", tiny_rows=16, val_size=0, shuffle=False, batch_size=4)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def test_completion_logps_match_full_forward(pref_batch):
    torch.manual_seed(0)
    from src.data.tiny import build_model

    model = build_model().eval()
    ids, attn, mask = pref_batch["input_ids"], pref_batch["attention_mask"], pref_batch["completion_mask"]
    ours, entropy = completion_logps(model, ids, attn, mask, with_entropy=True)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1], -1)
    expected = full.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    assert torch.allclose(ours[:, 1:], expected, atol=1e-5)
    assert (ours[mask == 0] == 0).all() and (entropy[mask == 0] == 0).all()
    ref_entropy = -(full.exp() * full).sum(-1)[mask[:, 1:].bool()]
    assert torch.allclose(entropy[:, 1:][mask[:, 1:].bool()], ref_entropy, atol=1e-4)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_step0_loss_at_policy_equal_reference(pref_batch, loss_type):
    beta = 0.1
    module = DPO(beta=beta, loss_type=loss_type, label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0)
    module.configure_model()
    loss, metrics = module.compute_loss(pref_batch)
    expected = {
        "sigmoid": math.log(2),
        "robust": math.log(2),
        "hinge": 1.0,
        "ipo": 1 / (4 * beta**2),
        "nca_pair": 2 * math.log(2),
        "apo_zero": 1.0,
        "apo_down": 1.0,
        "sppo_hard": 0.5 / beta**2,
        # EXO with ε = 1e-3 at h = 0: ½(ln ½ − ln(1−ε)) + ½(ln ½ − ln ε)
        "exo_pair": 0.5 * (math.log(0.5) - math.log(1 - 1e-3)) + 0.5 * (math.log(0.5) - math.log(1e-3)),
    }[loss_type]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.all(metrics["rewards/margins"] == 0)


def test_simpo_and_rpo_run(pref_batch):
    module = DPO(loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    module.configure_model()
    assert module.ref_model is None
    loss, _ = module.compute_loss(pref_batch)
    assert torch.isfinite(loss)
    rpo = DPO(rpo_alpha=1.0)
    rpo.configure_model()
    loss, metrics = rpo.compute_loss(pref_batch)
    assert loss.item() == pytest.approx(math.log(2) + metrics["nll_loss"][0].item(), rel=1e-5)


def _losses(run_cli, *extra):
    cli = run_cli(["fit", "--config", "dpo.yaml", *FAST, "--trainer.max_steps=4", *extra])
    return column(read_metrics(cli.trainer.logger.log_dir), "train/loss"), cli


def test_precomputed_reference_equals_frozen_copy(run_cli):
    frozen, _ = _losses(run_cli)
    pre, cli = _losses(run_cli, "--model.init_args.precompute_ref_logps=true")
    assert len(frozen) == 4 and frozen[0] == pytest.approx(math.log(2), abs=1e-6)
    assert pre == pytest.approx(frozen, abs=1e-5)
    assert cli.model.ref_model is None  # freed after precomputing
    assert "ref_chosen_logps" in cli.datamodule.train_set[0]


def test_lora_reference_is_the_base_model(run_cli):
    pytest.importorskip("peft")
    lora = '{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}'
    losses, cli = _losses(run_cli, f"--model.init_args.lora={lora}")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] != losses[0]
    module = cli.model
    assert module.ref_model is None
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = next(iter(cli.datamodule.train_dataloader()))
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    from src.data.tiny import build_model

    torch.manual_seed(42)  # seed_everything(42) precedes model construction in the CLI
    base = build_model().eval()
    with torch.no_grad():
        expected = completion_logps(base, ids, attn, mask)[0]
    assert torch.allclose(module.reference_logps(ids, attn, mask), expected, atol=1e-5)
    assert not torch.allclose(module.policy_logps(batch)[0], expected, atol=1e-4)


def test_tr_dpo_syncs_the_reference(run_cli):
    _, cli = _losses(
        run_cli,
        "--model.init_args.ref_model_sync_steps=2",
        "--model.init_args.ref_model_mixup_alpha=1.0",
        "--trainer.max_steps=5",
    )
    module = cli.model
    # α = 1 copies the policy at steps 2 and 4; step 5 moves the policy away again
    ref = dict(module.ref_model.named_parameters())
    moved = [(ref[n] - p).abs().max().item() for n, p in module.model.named_parameters()]
    assert max(moved) > 0
    _, cli2 = _losses(run_cli)
    ref2 = dict(cli2.model.ref_model.named_parameters())
    dist_sync = sum((ref[n] - p).norm() for n, p in module.model.named_parameters())
    dist_frozen = sum((ref2[n] - p).norm() for n, p in cli2.model.model.named_parameters())
    assert dist_sync < dist_frozen


def test_user_data_path_trains_and_writes_csv(run_cli, tmp_path):
    path = tmp_path / "my_pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_rows("preference", 40, seed=3)))
    cli = run_cli(["fit", "--config", "dpo.yaml", *FAST, f"--data.path={path}", "--data.val_size=8"])
    assert len(cli.datamodule.train_set) == 32
    rows = read_metrics(cli.trainer.logger.log_dir)
    assert column(rows, "train/loss") and column(rows, "val/rewards/accuracies")
    assert Path(cli.trainer.logger.log_dir, "config.yaml").exists()


def test_wandb_offline_run_has_metrics_and_config(run_cli, tmp_path):
    cli = run_cli(["fit", "--config", "dpo.yaml", "--config", "logger/wandb.yaml", *FAST])
    runs = list((tmp_path / "runs" / "dpo" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()  # protobuf records: keys and string values are stored as plain UTF-8
    for key in ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen", "val/loss"):
        assert key.encode() in data, key
    assert b"config_yaml" in data and b"src.modules.dpo.DPO" in data  # the resolved config
    assert cli.trainer.loggers[0].log_dir  # CSV fallback alongside


def test_nan_loss_is_caught_in_its_step(run_cli, pref_batch):
    module = DPO()
    module.configure_model()
    with torch.no_grad():
        next(module.model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"DPO loss is NaN at global step 0"):
        module.training_step(pref_batch, 0)
    skip = DPO(nan_policy="skip")
    skip.configure_model()
    with torch.no_grad():
        next(skip.model.parameters()).fill_(float("nan"))
    skip.log = lambda *a, **k: None
    assert skip.training_step(pref_batch, 0) is None and skip.skipped_steps == 1


def test_reference_from_a_separate_checkpoint(run_cli, tmp_path):
    from src.data.tiny import build_model, load_tokenizer

    torch.manual_seed(7)
    build_model().save_pretrained(tmp_path / "policy")
    load_tokenizer().save_pretrained(tmp_path / "policy")
    torch.manual_seed(8)
    build_model().save_pretrained(tmp_path / "other")
    same, _ = _losses(
        run_cli,
        f"--model.init_args.model_name_or_path={tmp_path / 'policy'}",
        f"--model.init_args.ref_model_name_or_path={tmp_path / 'policy'}",
    )
    assert same[0] == pytest.approx(math.log(2), abs=1e-6)  # reference = policy at step 1
    other, cli = _losses(
        run_cli,
        f"--model.init_args.model_name_or_path={tmp_path / 'policy'}",
        f"--model.init_args.ref_model_name_or_path={tmp_path / 'other'}",
    )
    assert other[0] != pytest.approx(math.log(2), abs=1e-3)  # a different reference shifts the implicit rewards
    assert cli.model.ref_model is not None and not cli.model.ref_model.training


class _ParamsAfterEachStep(Callback):
    """The policy's parameters after each optimizer step, by global step (0: the initial policy)."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.by_step[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def test_tr_dpo_syncs_once_per_optimizer_step_under_gradient_accumulation():
    # k = 2, α = 0.5, 2 micro-batches per optimizer step: the reference mixes in the policy after optimizer steps 2
    # and 4 only, θ_ref = α θ_4 + (1 − α)(α θ_2 + (1 − α) θ_0), however many micro-batches each step has.
    torch.manual_seed(0)
    dm = AlignmentDataModule(kind="preference", tiny_rows=32, val_size=0, batch_size=2)
    module = DPO(ref_model_sync_steps=2, ref_model_mixup_alpha=0.5)
    params = _ParamsAfterEachStep()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=5,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[params],
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 5 and sorted(params.by_step) == [0, 1, 2, 3, 4, 5]
    theta = params.by_step
    a = 0.5
    for name, ref in module.ref_model.named_parameters():
        expected = a * theta[4][name] + (1 - a) * (a * theta[2][name] + (1 - a) * theta[0][name])
        torch.testing.assert_close(ref, expected, rtol=1e-6, atol=1e-6, msg=name)


def test_precomputed_reference_cannot_be_synced():
    with pytest.raises(ValueError, match=r"precompute_ref_logps.*ref_model_sync_steps"):
        DPO(precompute_ref_logps=True, ref_model_sync_steps=4)


def test_tr_dpo_needs_a_separate_reference():
    with pytest.raises(ValueError, match=r"ref_model_sync_steps.*lora"):
        DPO(ref_model_sync_steps=4, lora={"r": 4})
    with pytest.raises(ValueError, match=r"ref_model_sync_steps.*simpo"):
        DPO(ref_model_sync_steps=4, loss_type="simpo")


def test_exo_pair_needs_label_smoothing():
    # TRL raises for exo_pair with label_smoothing == 0 (the EXO paper's ε = 1e-3 must be set explicitly)
    with pytest.raises(ValueError, match=r"label_smoothing.*exo_pair"):
        DPO(loss_type="exo_pair")


@pytest.mark.parametrize(
    "loss_type,expected",
    [
        ("bco_pair", 2 * math.log(2)),
        ("aot", math.log(2)),
        ("aot_unpaired", math.log(2)),
        ("discopop", 0.5 * math.log(2) + 0.5),  # (1 − s(0)) ln 2 + s(0) e^0
        ("sigmoid_norm", math.log(2)),
        ("sft", None),  # the NLL of the chosen completions alone
    ],
)
def test_step0_loss_of_the_new_loss_types(pref_batch, loss_type, expected):
    module = DPO(loss_type=loss_type)
    module.configure_model()
    loss, metrics = module.compute_loss(pref_batch)
    if expected is None:
        expected = metrics["nll_loss"][0].item()
        assert expected > 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.all(metrics["rewards/margins"] == 0)


def test_rpo_alpha_is_an_sft_term(pref_batch):
    torch.manual_seed(0)
    rpo = DPO(rpo_alpha=0.7)
    rpo.configure_model()
    assert rpo.loss_terms == (("sigmoid", 1.0), ("sft", 0.7))
    mpo = DPO(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7])
    mpo.configure_model()
    mpo.model.load_state_dict(rpo.model.state_dict())
    mpo.set_reference(rpo.ref_model)
    grads = []
    for module in (rpo, mpo):
        loss, metrics = module.compute_loss(pref_batch)
        assert loss.item() == pytest.approx(math.log(2) + 0.7 * metrics["nll_loss"][0].item(), rel=1e-6)
        grads.append(torch.autograd.grad(loss, list(module.model.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_weighted_loss_list_is_the_weighted_sum_of_its_terms(pref_batch):
    torch.manual_seed(0)
    mix = DPO(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])  # MPO's recipe
    mix.configure_model()
    with torch.no_grad():  # move the policy off the reference so that every term is non-trivial
        for p in mix.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    total, metrics = mix.compute_loss(pref_batch)
    parts = {}
    for loss_type in ("sigmoid", "bco_pair", "sft"):
        one = DPO(loss_type=loss_type)
        one.model, one._ref = mix.model, mix.ref_model
        parts[loss_type] = one.compute_loss(pref_batch)[0].item()
    assert total.item() == pytest.approx(0.8 * parts["sigmoid"] + 0.2 * parts["bco_pair"] + parts["sft"], rel=1e-6)
    assert metrics["nll_loss"][0].item() == pytest.approx(parts["sft"], rel=1e-6)


def test_wpo_scores_with_one_forward_and_the_full_distribution(pref_batch):
    torch.manual_seed(0)
    module = DPO(use_weighting=True)
    module.configure_model()
    logps, log_sum_sq = module.policy_token_logps(pref_batch)
    torch.testing.assert_close(logps, module.policy_logps(pref_batch)[0])
    ids, attn, mask = pref_batch["input_ids"], pref_batch["attention_mask"], pref_batch["completion_mask"]
    with torch.no_grad():
        full = torch.log_softmax(module.model(input_ids=ids, attention_mask=attn).logits[:, :-1].double(), -1)
    expected = torch.logsumexp(2 * full, -1)[mask[:, 1:].bool()]  # log Σ_v p_v² at the completion positions
    torch.testing.assert_close(log_sum_sq[:, 1:][mask[:, 1:].bool()].double(), expected, atol=1e-5, rtol=1e-5)
    assert (log_sum_sq[mask == 0] == 0).all()
    loss, _ = module.compute_loss(pref_batch)
    assert 0 < loss.item() < math.log(2)  # ln 2 times the pair weights, each < 1


@pytest.mark.parametrize("loss_type,ld_alpha", [("ipo", None), ("sigmoid", 0.5)])
def test_precomputed_reference_matches_live_reference(loss_type, ld_alpha):
    # the precomputed reference log-probs are the live ones: summed (ipo averages inside dpo_loss) or LD-weighted
    dm = AlignmentDataModule(kind="preference", tiny_rows=16, val_size=0, shuffle=False, batch_size=4)
    dm.setup()
    torch.manual_seed(0)
    module = DPO(loss_type=loss_type, ld_alpha=ld_alpha, precompute_ref_logps=True)
    module.configure_model()
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    live = module.compute_loss(next(iter(dm.train_dataloader())))[0]
    dm.add_columns(("ref_chosen_logps", "ref_rejected_logps"), module.reference_sequence_logps)
    batch = next(iter(dm.train_dataloader()))
    assert "ref_chosen_logps" in batch
    module.set_reference(None)  # from now on only the precomputed columns can give the reference
    assert module.compute_loss(batch)[0].item() == pytest.approx(live.item(), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), r"loss_weights.*loss_type"),
        (dict(loss_type=["sigmoid", "sft"], rpo_alpha=1.0), r"rpo_alpha.*loss_type"),
        (dict(loss_type="nca_pair", f_divergence_type="forward_kl"), r"f_divergence_type.*loss_type.*nca_pair"),
        (dict(loss_type="aot", use_weighting=True), r"use_weighting.*loss_type.*aot"),
        (dict(loss_type="simpo", ld_alpha=0.5), r"ld_alpha.*loss_type='simpo'"),
        (dict(ld_alpha=1.5), r"ld_alpha must lie in \[0, 1\]"),
        (dict(loss_type="discopop", discopop_tau=0.0), r"discopop_tau"),
        (dict(loss_type="robust", label_smoothing=0.5), r"label_smoothing.*robust"),
    ],
)
def test_incompatible_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPO(**kwargs)


def test_new_options_through_the_cli(run_cli):
    # a loss list + WPO + LD-DPO + a JS f-divergence on the tiny default: it trains (the NLL falls; the WPO-weighted
    # loss itself may rise as the weights grow with the policy's confidence) and logs the NLL term
    losses, cli = _losses(
        run_cli,
        "--model.init_args.loss_type=[sigmoid, sft]",
        "--model.init_args.loss_weights=[1.0, 0.5]",
        "--model.init_args.use_weighting=true",
        "--model.init_args.ld_alpha=0.5",
        "--model.init_args.f_divergence_type=js_divergence",
    )
    assert cli.model.loss_terms == (("sigmoid", 1.0), ("sft", 0.5))
    nll = column(read_metrics(cli.trainer.logger.log_dir), "train/nll_loss")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert nll[-1] < nll[0]

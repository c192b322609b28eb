"""Side by side with TRL 1.16: our GRPO / RLOO advantages, losses, gradients and metrics against TRL's own
``GRPOTrainer`` and ``RLOOTrainer`` code, on identical random float64 inputs.

TRL side: a bare trainer (``object.__new__``) holding only the attributes its methods read, then the real
``_generate_and_score_completions`` (rewards -> advantages, ``num_items_in_batch``, reference / old log-probs) with
``_generate`` and ``_calculate_rewards`` returning given token ids and raw per-function rewards (NaN = the function
returned None), and the real ``_compute_loss`` once per micro-batch, with ``_get_per_token_logps_and_entropies``
returning a leaf tensor (``requires_grad``) instead of running a model. An accelerator stand-in gathers on one process.

Our side: the production wiring of ``src.modules.grpo.GRPO``, called unbound on a namespace: ``GRPO.advantages`` on
the rewards ``RewardScorer.combine`` builds from the same raw rewards, then ``GRPO._optimizer_step`` (micro-batches,
``num_items``, entropy mask, ``grpo_loss`` / ``rloo_loss``, entropy bonus, ``manual_backward``) with ``token_logps``
returning rows of another leaf with the same values. Both leaves' gradients are compared, with the loss and the metrics.

Name mapping (TRL -> ours): ``epsilon`` -> ``epsilon_low``; ``use_bias_correction_kl`` -> ``kl_ratio_correction``;
``max_completion_length`` -> ``max_new_tokens``; ``reward_weights`` -> the ``RewardScorer`` weights; RLOOTrainer ->
``advantage: rloo`` (+ ``loss_type: rloo`` for its sequence-ratio objective); ``num_iterations > 1`` (TRL computes
``old_per_token_logps``) -> ``buf["old_logps"]``; TRL's ``gradient_accumulation_steps = steps_per_generation = k``
(one generation round per optimizer step, k micro-batches) -> ``micro_batch_size = B / k``.

Float64 agreement: TRL's ``nanstd`` (every GRPO advantage, RLOO's ``normalize_advantages``) takes its Bessel factor
``count / (count - 1)`` as a float32 tensor (integer true division), ours in float64, so advantages differ by up to
~5e-8 (losses ~1e-8, gradients ~2e-9). With that factor in float64, TRL and ours agree to ~1e-16
(``test_grpo_matches_trl_to_rounding_with_a_float64_nanstd``).

Not compared (absent from TRL 1.16 or outside these code paths): our ``kl`` estimators k1 / k2 (TRL's GRPO has k3
only), ``reward_clip_range`` / ``normalize_advantages`` with GRPO advantages (RLOO-only options in TRL), vLLM
importance-sampling correction, the adaptive entropy controller's state across steps, RLOO's logged ``kl`` (ours is
computed in ``training_step``, not in the step compared here).
"""

from __future__ import annotations

import inspect
import math
import types
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
import accelerate  # noqa: E402
from trl import GRPOConfig, RLOOConfig  # noqa: E402
from trl.trainer import grpo_trainer as trl_grpo_module  # noqa: E402
from trl.trainer import rloo_trainer as trl_rloo_module  # noqa: E402
from trl.trainer.utils import nanstd as trl_nanstd  # noqa: E402

from src.losses import (  # noqa: E402
    high_entropy_mask,
    nanstd,
    off_policy_sequence_mask,
    sequence_kl_penalty,
    vespo_weights,
)
from src.models import ReferenceSync  # noqa: E402
from src.modules.grpo import GRPO, check_options  # noqa: E402
from src.rewards import RewardScorer  # noqa: E402

F64 = torch.float64
NAN = float("nan")
G = 4  # num_generations
LENGTHS = [7, 3, 5, 1, 6, 7, 2, 4, 7, 5, 3, 6]  # completion lengths; max = C, right padding in 9 of 12 rows
PROMPT_LENGTHS = [2, 4, 3]  # one prompt per group (left padding in TRL's prompt tensor)
B, C = len(LENGTHS), max(LENGTHS)
MAX_COMPLETION_LENGTH = 10  # dr_grpo's constant normaliser
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"]
CISPO_EPS_HIGH = 1.1  # CISPO's absolute cap of the weight, low enough here that some tokens are capped
TOL = 1e-6
EOS = 2  # token ids in the inputs are >= 3, except where a test puts EOS
_MAX_DIFF = {"float64": (0.0, ""), "metrics": (0.0, "")}  # metrics: ours are float32

accelerate.PartialState()  # gather / gather_object in TRL's code paths need the (single-process) state


# ---------------------------------------------------------------------------------------------------- inputs
def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-token log-probs of the policy (current, old = sampling, reference) and entropies ``[B, C]``, finite but
    arbitrary at padding (neither side may use them), and raw rewards of two functions ``[B, 2]`` with None (NaN):
    row 2 unscorable (both None), rows 5 and 9 scored by one function only."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(C)[None] < torch.tensor(LENGTHS)[:, None]).long()
    logps = -3 * torch.rand(B, C, generator=g, dtype=F64)
    old = logps + 0.4 * torch.randn(B, C, generator=g, dtype=F64)
    ref = logps + 0.5 * torch.randn(B, C, generator=g, dtype=F64)
    entropies = 2.5 * torch.rand(B, C, generator=g, dtype=F64)
    per_func = torch.randn(B, 2, generator=g, dtype=F64)
    per_func[2] = NAN
    per_func[5, 1] = NAN
    per_func[9, 0] = NAN
    ids = torch.randint(3, 100, (B, C), generator=g)
    prompt_ids = [torch.randint(3, 100, (PROMPT_LENGTHS[i // G],), generator=g).tolist() for i in range(B)]
    completion_ids = [ids[i, : LENGTHS[i]].tolist() for i in range(B)]
    return {
        "mask": mask,
        "logps": logps,
        "old": old,
        "ref": ref,
        "entropies": entropies,
        "per_func": per_func,
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
    }


def _edge_rewards() -> torch.Tensor:
    """Raw rewards ``[B, 2]`` with the advantage edge cases: group 0 has an unscorable row and a half-scored one,
    group 1 a single scorable completion (its group std is NaN in TRL), group 2 equal totals (std 0)."""
    g = torch.Generator().manual_seed(1)
    r = torch.randn(B, 2, generator=g, dtype=F64)
    r[1] = NAN
    r[3, 0] = NAN
    r[4:7] = NAN  # group 1: only row 7 is scorable
    r[8:12] = torch.tensor([0.5, -1.0], dtype=F64)  # weighted total 1.0 * 0.5 + 0.5 * -1.0 = 0
    r[10] = torch.tensor([0.0, NAN], dtype=F64)  # total 0 too, with one None
    return r


def _record(diff: float, what: str) -> None:
    kind = "metrics" if what.startswith("metric ") else "float64"
    if diff > _MAX_DIFF[kind][0]:
        _MAX_DIFF[kind] = (diff, what)


def _close(ours, theirs, what: str, tol: float = TOL) -> None:
    ours = torch.as_tensor(ours, dtype=F64)
    theirs = torch.as_tensor(theirs, dtype=F64)
    assert ours.shape == theirs.shape, f"{what}: shapes {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all(), f"{what}: non-finite values"
    diff = float((ours - theirs).abs().max()) if ours.numel() else 0.0
    if diff <= tol:
        _record(diff, what)
    assert diff <= tol, f"{what}: max |ours - TRL| = {diff:.3e} > {tol:.0e}\nours={ours}\nTRL={theirs}"


@pytest.fixture(scope="module", autouse=True)
def _report_max_diff():
    yield
    for kind, (diff, what) in _MAX_DIFF.items():
        print(f"\n[trl parity grpo] max |ours - TRL| ({kind}) = {diff:.3e} ({what})", end="")
    print()


# ---------------------------------------------------------------------------------------------------- TRL side
class _Accelerator:
    """One process: gathers, reductions and padding across processes are the identity."""

    device = torch.device("cpu")
    process_index = 0
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction: str = "sum"):
        return x

    def pad_across_processes(self, x, dim: int = 0, pad_index: int = 0, pad_first: bool = False):
        return x


class _Model:
    """Stands in for the policy / reference model: only its identity and these flags are read."""

    training = True
    is_gradient_checkpointing = False


def _trl_common(t, args, per_func: torch.Tensor, weights) -> None:
    t.args = args
    t.accelerator = _Accelerator()
    t.model = _Model()
    t.ref_model = _Model() if args.beta != 0.0 else None
    t.beta = args.beta
    t.epsilon_low = args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t.num_generations = args.num_generations
    t.num_iterations = args.num_iterations
    t.max_completion_length = args.max_completion_length
    t.eos_token_ids = [EOS]
    t.temperature = args.temperature
    t.mask_truncated_completions = args.mask_truncated_completions
    t.pad_to_multiple_of = None
    t.reward_weights = torch.tensor(weights, dtype=torch.float32)
    t.reward_func_names = [f"r{i}" for i in range(len(weights))]
    t.reward_funcs = [object() for _ in weights]  # only their number is read
    t.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    t.aux_loss_enabled = False
    t._tokenizer = SimpleNamespace(pad_token_id=0)
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._logs = {
        "prompt": [],
        "completion": [],
        "rewards": defaultdict(list),
        "advantages": [],
        "extra": defaultdict(list),
        "images": [],
    }
    t._pending_extra_logs = {}
    t._pending_metrics = {}
    t.log_multimodal = False
    t._calculate_rewards = lambda inputs, prompts, completions, completion_ids_list: per_func.clone()
    t._parity_rows = slice(None)


def _logps_stub(t, data: dict, leaf: torch.Tensor, entropies: torch.Tensor, sampling: torch.Tensor):
    """``_get_per_token_logps_and_entropies``: under no_grad (generation) the sampling / reference log-probs of the
    whole batch; with grad (``_compute_loss``) the rows ``t._parity_rows`` of the leaf and of the entropies."""

    def fn(model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **_):
        assert logits_to_keep == C
        if torch.is_grad_enabled():
            rows = t._parity_rows
            assert input_ids.shape[0] == leaf[rows].shape[0]
            return leaf[rows], entropies[rows] if compute_entropy else None, None
        src = data["ref"] if model is t.ref_model else sampling
        return src.clone(), None, None

    return fn


def _trl_args(config_cls, micro_batches: int, **kw):
    base = {
        "output_dir": "trl_parity_grpo_unused",
        "report_to": [],
        "bf16": False,
        "use_cpu": True,
        "num_generations": G,
        "per_device_train_batch_size": B // micro_batches,
        "gradient_accumulation_steps": micro_batches,
        "max_completion_length": MAX_COMPLETION_LENGTH,
    }
    return config_cls(**{**base, **kw})


def _slice_inputs(out: dict, rows: slice) -> dict:
    per_row = {k for k, v in out.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B}
    return {k: v[rows] if k in per_row else v for k, v in out.items()}


def _trl_metrics(t) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in t._metrics["train"].items() if v}


def trl_grpo(data: dict, case: dict, micro_batches: int = 1, off_policy: bool = True, per_func=None):
    """TRL's GRPO on ``data``: advantages of its generation step, then the summed loss of its ``_compute_loss`` over
    the micro-batches and the gradients of their sum w.r.t. the log-probs (and the entropies)."""
    case = dict(case)
    weights = case.pop("reward_weights", [1.0, 0.5])
    per_func = data["per_func"] if per_func is None else per_func
    args = _trl_args(GRPOConfig, micro_batches, num_iterations=2 if off_policy else 1, **case)
    t = object.__new__(trl_grpo_module.GRPOTrainer)
    _trl_common(t, args, per_func, weights)
    t.loss_type = args.loss_type
    t.multi_objective_aggregation = args.multi_objective_aggregation
    t.scale_rewards = args.scale_rewards
    t.importance_sampling_level = args.importance_sampling_level
    t.off_policy_mask_threshold = args.off_policy_mask_threshold
    t.top_entropy_quantile = args.top_entropy_quantile
    t.entropy_coef = args.entropy_coef
    t.use_adaptive_entropy = args.use_adaptive_entropy
    t._entropy_bonus_enabled = t.entropy_coef != 0.0 or t.use_adaptive_entropy
    t._last_world_entropy = float("inf")
    t._entropy_window_stats = None
    t.use_vllm = False
    t.vllm_importance_sampling_correction = False
    t.tools = None
    t.environment_factories = None
    t.environments = []
    leaf = data["logps"].clone().requires_grad_(True)
    entropies = data["entropies"].clone().requires_grad_(True)
    t._get_per_token_logps_and_entropies = _logps_stub(t, data, leaf, entropies, data["old"])
    completions = [f"completion {i}" for i in range(B)]
    t._generate = lambda prompts: (data["prompt_ids"], data["completion_ids"], None, completions, None, {}, None, None)

    out = t._generate_and_score_completions([{"prompt": f"prompt {i // G}"} for i in range(B)])
    assert ("old_per_token_logps" in out) == off_policy
    total = torch.zeros((), dtype=F64)
    size = B // micro_batches
    for k in range(micro_batches):
        rows = slice(k * size, (k + 1) * size)
        t._parity_rows = rows
        loss = t._compute_loss(t.model, _slice_inputs(out, rows))
        loss.backward()
        total = total + loss.detach()
    return SimpleNamespace(
        loss=total,
        grad=leaf.grad,
        entropy_grad=entropies.grad,
        advantages=out["advantages"],
        metrics=_trl_metrics(t),
        inputs=out,
    )


def trl_rloo(data: dict, case: dict, micro_batches: int = 1, per_func=None):
    """TRL's RLOO: advantages (leave-one-out, KL in the reward) and the sequence-ratio loss. HF's Trainer divides
    RLOO's (unscaled) micro-batch loss by the accumulation steps before backward; we do the same here."""
    case = dict(case)
    weights = case.pop("reward_weights", [1.0, 0.5])
    per_func = data["per_func"] if per_func is None else per_func
    args = _trl_args(RLOOConfig, micro_batches, **case)
    t = object.__new__(trl_rloo_module.RLOOTrainer)
    _trl_common(t, args, per_func, weights)
    t.reward_clip_range = args.reward_clip_range
    t.normalize_advantages = args.normalize_advantages
    leaf = data["logps"].clone().requires_grad_(True)
    entropies = data["entropies"].clone()
    t._get_per_token_logps_and_entropies = _logps_stub(t, data, leaf, entropies, data["old"])
    completions = [f"completion {i}" for i in range(B)]
    t._generate = lambda prompts: (data["prompt_ids"], data["completion_ids"], completions)

    out = t._generate_and_score_completions([{"prompt": f"prompt {i // G}"} for i in range(B)])
    total = torch.zeros((), dtype=F64)
    size = B // micro_batches
    for k in range(micro_batches):
        rows = slice(k * size, (k + 1) * size)
        t._parity_rows = rows
        loss = t._compute_loss(t.model, _slice_inputs(out, rows)) / t.current_gradient_accumulation_steps
        loss.backward()
        total = total + loss.detach()
    return SimpleNamespace(
        loss=total, grad=leaf.grad, advantages=out["advantages"], metrics=_trl_metrics(t), inputs=out
    )


# ---------------------------------------------------------------------------------------------------- our side
def _our_defaults() -> dict:
    """Every keyword default of GRPO's constructor chain (GRPO, OnlineModule, the base module)."""
    out = {}
    for cls in reversed(GRPO.__mro__):
        init = cls.__dict__.get("__init__")
        if init is None or not inspect.isfunction(init):
            continue
        for name, p in inspect.signature(init).parameters.items():
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD:
                out[name] = p.default
    return out


DEFAULTS = _our_defaults()
TRL_TO_OURS = {
    "epsilon": "epsilon_low",
    "use_bias_correction_kl": "kl_ratio_correction",
    "max_completion_length": "max_new_tokens",
}


def _to_ours(case: dict, *, rloo: bool = False) -> dict:
    """TRL option names -> ours (RLOO: ``advantage: rloo``; ``loss_type: rloo`` for its objective)."""
    out = {TRL_TO_OURS.get(k, k): v for k, v in case.items() if k != "reward_weights"}
    if rloo:
        out.setdefault("advantage", "rloo")
        out.setdefault("loss_type", "rloo")
        out.setdefault("beta", 0.05)  # RLOOConfig's default (GRPO's is 0)
    return out


def ours(data: dict, case: dict, micro_batches: int = 1, off_policy: bool = True, per_func=None, rloo=False):
    """Our GRPO module's advantages and one ``_optimizer_step`` over the whole batch, unbound on a namespace."""
    weights = case.get("reward_weights", [1.0, 0.5])
    per_func = data["per_func"] if per_func is None else per_func
    h = SimpleNamespace(
        **{
            **DEFAULTS,
            "num_generations": G,
            "max_new_tokens": MAX_COMPLETION_LENGTH,
            "micro_batch_size": B // micro_batches,
            "max_grad_norm": None,
            "num_iterations": 2 if off_policy else 1,
            **_to_ours(case, rloo=rloo),
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's warnings on luspo / vespo / sequence-level sums, repeated here
        check_options(h, has_rewards=True)
    scorer = RewardScorer([lambda **_: None, lambda **_: None], weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "all reward functions returned None" for the unscorable row
        rewards, _ = scorer.combine(per_func)
    mask = data["mask"]
    old = data["old"] if off_policy else None
    buf = {
        "rewards": rewards,
        "rewards_per_func": per_func,
        "loss_mask": mask.clone(),
        "completion_mask": mask,
        "old_logps": old,
        "ref_logps": data["ref"] if h.beta > 0 else None,
    }
    if h.mask_truncated_completions:  # as GRPO.training_step
        buf["loss_mask"][data["is_truncated"]] = 0
    if h.loss_type == "rloo" and h.beta > 0:  # as GRPO.training_step: KL of the sampling policy, in the reward
        buf["seq_kl"] = sequence_kl_penalty(data["old"], buf["ref_logps"], mask)
    leaf = data["logps"].clone().requires_grad_(True)
    entropies = data["entropies"].clone().requires_grad_(True)
    m = SimpleNamespace(
        hparams=h,
        rewards=scorer,
        device=torch.device("cpu"),
        entropy_coef=float(h.entropy_coef),
        last_entropy=math.inf,
        entropy_bonus=h.entropy_coef != 0.0 or h.use_adaptive_entropy,
        global_step=0,
        sync_reference=ReferenceSync(0, 0.6),
        ref_model=None,
        model=None,
    )
    for name in ("advantages", "_optimizer_step", "_world", "_global_sum", "_gather_pool"):
        setattr(m, name, types.MethodType(getattr(GRPO, name), m))
    m._chunks = GRPO._chunks
    m.attached_trainer = lambda: None
    m.token_logps = lambda buf, idx, with_entropy=False, entropy_grad=False: (leaf[idx], entropies[idx])
    m.manual_backward = lambda loss: loss.backward()

    def check_finite(value, name):
        assert torch.isfinite(value).all(), name
        return True

    m.check_finite = check_finite
    opt = SimpleNamespace(step=lambda: None, zero_grad=lambda set_to_none=True: None)
    adv = m.advantages(buf["rewards"], buf)
    loss, metrics = m._optimizer_step(buf, adv, slice(0, B), opt)
    return SimpleNamespace(
        loss=loss,
        grad=leaf.grad,
        entropy_grad=entropies.grad,
        advantages=adv,
        metrics={k: float(v) for k, v in metrics.items()},
    )


def _compare(o, t, *, entropy_grad: bool = False, metrics: bool = True, need_entropy: bool = True) -> None:
    _close(o.advantages, t.advantages, "advantages")
    _close(o.loss, t.loss, "loss")
    assert o.grad is not None and t.grad is not None
    _close(o.grad, t.grad, "d loss / d logps")
    if entropy_grad:
        _close(o.entropy_grad, t.entropy_grad, "d loss / d entropies")
    if metrics:
        shared = set(o.metrics) & set(t.metrics)
        assert "entropy" in shared or not need_entropy, (sorted(o.metrics), sorted(t.metrics))
        flipped = ((o.advantages > 0) != (t.advantages > 0)) | ((o.advantages < 0) != (t.advantages < 0))
        if bool(flipped.any()):
            # An advantage that is 0 up to rounding (|A| ~ 1e-17, e.g. GDPO's batch mean) may get either sign: the
            # clip counts (which test A > 0 / A < 0) then differ by that row's tokens, the loss by ~1e-17.
            assert float(t.advantages[flipped].abs().max()) < 1e-12, (o.advantages, t.advantages)
            shared -= {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio"}
        for key in sorted(shared):
            _close(o.metrics[key], t.metrics[key], f"metric {key}")  # ours are float32


# ---------------------------------------------------------------------------------------------------- cases
def _lt(loss_type: str, **kw) -> dict:
    case = {"loss_type": loss_type, **kw}
    if loss_type == "cispo":
        case.setdefault("epsilon_high", CISPO_EPS_HIGH)
    return case


MAIN = [
    pytest.param(_lt(lt, importance_sampling_level=level, beta=beta), id=f"{lt}-{level}-beta{beta}")
    for lt in LOSS_TYPES
    for level in ("token", "sequence")
    for beta in (0.0, 0.04)
]

EXTRA = [
    pytest.param(_lt("dapo", epsilon_high=0.28), id="dapo-clip_higher"),
    pytest.param(_lt("grpo", epsilon_high=0.28, importance_sampling_level="sequence"), id="gspo-clip_higher"),
    pytest.param(_lt("grpo", delta=1.5, beta=0.04), id="grpo-delta"),
    # sequence ratios lie in [0.54, 1.27] here: a tighter clip so that the cap delta = 1.2 > 1 + eps_high binds
    pytest.param(_lt("dapo", epsilon=0.1, delta=1.2, importance_sampling_level="sequence"), id="dapo-sequence-delta"),
    pytest.param(
        _lt("luspo", epsilon=0.1, delta=1.2, importance_sampling_level="sequence", beta=0.04), id="luspo-delta"
    ),
    pytest.param(_lt("grpo", beta=0.04, use_bias_correction_kl=False), id="grpo-kl_uncorrected"),
    pytest.param(
        _lt("dapo", beta=0.04, use_bias_correction_kl=False, importance_sampling_level="sequence"),
        id="dapo-sequence-kl_uncorrected",
    ),
    pytest.param(_lt("grpo", scale_rewards="batch"), id="grpo-scale_batch"),
    pytest.param(_lt("dapo", scale_rewards="batch", beta=0.04), id="dapo-scale_batch"),
    pytest.param(_lt("dr_grpo", scale_rewards="none"), id="dr_grpo-scale_none"),
    pytest.param(_lt("bnpo", scale_rewards="none", beta=0.04), id="bnpo-scale_none"),
    pytest.param(_lt("dapo", reward_weights=[0.7, -1.3]), id="dapo-reward_weights"),
    pytest.param(_lt("grpo", reward_weights=[2.0, 0.25], scale_rewards="batch"), id="grpo-reward_weights-batch"),
    pytest.param(_lt("dapo", multi_objective_aggregation="normalize_then_sum"), id="dapo-gdpo"),
    pytest.param(
        _lt("grpo", multi_objective_aggregation="normalize_then_sum", reward_weights=[0.7, -1.3], beta=0.04),
        id="grpo-gdpo-weights",
    ),
    *[
        pytest.param(_lt(lt, off_policy_mask_threshold=0.05, importance_sampling_level=level), id=f"{lt}-{level}-opsm")
        for lt in LOSS_TYPES
        for level in ("token", "sequence")
    ],
    *[pytest.param(_lt(lt, top_entropy_quantile=0.3), id=f"{lt}-entropy_mask") for lt in LOSS_TYPES],
    pytest.param(_lt("grpo", top_entropy_quantile=0.0), id="grpo-entropy_mask_top1"),
    pytest.param(
        _lt("dapo", top_entropy_quantile=0.3, importance_sampling_level="sequence", beta=0.04),
        id="dapo-sequence-entropy_mask-kl",
    ),
    pytest.param(
        _lt(
            "grpo",
            beta=0.04,
            importance_sampling_level="sequence",
            epsilon=0.1,
            delta=1.2,
            off_policy_mask_threshold=0.05,
            top_entropy_quantile=0.5,
            reward_weights=[0.7, -1.3],
            scale_rewards="batch",
        ),
        id="grpo-everything",
    ),
]


@pytest.mark.parametrize("case", MAIN + EXTRA)
def test_grpo_matches_trl(case):
    data = _data()
    _compare(ours(data, case), trl_grpo(data, case))


def _nanstd_float64(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """TRL's ``nanstd`` with its Bessel factor in the input's dtype rather than float32."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True).to(x.dtype)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(count, NAN))
    std = var.sqrt()
    return std if keepdim else std.squeeze(dim) if dim is not None else std.reshape(())


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(_lt("dapo", beta=0.04), id="dapo"),
        pytest.param(_lt("grpo", importance_sampling_level="sequence", scale_rewards="batch"), id="gspo-batch"),
        pytest.param(_lt("vespo", multi_objective_aggregation="normalize_then_sum"), id="vespo-gdpo"),
        EXTRA[-1],
    ],
)
def test_grpo_matches_trl_to_rounding_with_a_float64_nanstd(case, monkeypatch):
    """The ~5e-8 of the advantages is TRL's float32 Bessel factor alone: in float64 both sides agree to 1e-12."""
    monkeypatch.setattr(trl_grpo_module, "nanstd", _nanstd_float64)
    data = _data()
    o, t = ours(data, case), trl_grpo(data, case)
    for what in ("advantages", "loss", "grad"):
        _close(getattr(o, what), getattr(t, what), f"{what} (float64 nanstd)", tol=1e-12)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "vespo", "luspo"])
def test_grpo_on_policy_matches_trl(loss_type):
    """``num_iterations = 1``: TRL uses ``per_token_logps.detach()`` as the old log-probs (ratio 1), ours too."""
    data = _data()
    case = _lt(loss_type, beta=0.04, importance_sampling_level="sequence" if loss_type == "luspo" else "token")
    _compare(ours(data, case, off_policy=False), trl_grpo(data, case, off_policy=False))


@pytest.mark.parametrize(
    "case",
    [pytest.param(_lt(lt, beta=0.04), id=lt) for lt in LOSS_TYPES]
    + [
        pytest.param(_lt("grpo", importance_sampling_level="sequence", beta=0.04), id="gspo"),
        pytest.param(_lt("dapo", top_entropy_quantile=0.3, off_policy_mask_threshold=0.05), id="dapo-masks"),
    ],
)
def test_grpo_micro_batches_match_trl_accumulation(case):
    """Two micro-batches of 6 (ours: ``micro_batch_size``) = TRL's ``gradient_accumulation_steps = 2`` with one
    generation round per optimizer step; the entropy quantile is taken per micro-batch on both sides."""
    data = _data()
    _compare(ours(data, case, micro_batches=2), trl_grpo(data, case, micro_batches=2))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(_lt("dapo", entropy_coef=0.01), id="dapo"),
        pytest.param(_lt("grpo", entropy_coef=0.05, top_entropy_quantile=0.3, beta=0.04), id="grpo-entropy_mask"),
        pytest.param(_lt("sapo", entropy_coef=0.02, importance_sampling_level="sequence"), id="sapo-sequence"),
    ],
)
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_grpo_entropy_bonus_matches_trl(case, micro_batches):
    """A fixed entropy bonus: ``- c * mean H`` over the policy-loss tokens, gradient w.r.t. the entropies too. The
    logged ``policy_loss`` differs by convention only with several micro-batches (TRL: the mean of the micro-batch
    values, ours: their sum, the step's loss), so it is compared for one micro-batch."""
    data = _data()
    o, t = ours(data, case, micro_batches=micro_batches), trl_grpo(data, case, micro_batches=micro_batches)
    if micro_batches > 1:
        o.metrics.pop("policy_loss"), t.metrics.pop("policy_loss")
    _compare(o, t, entropy_grad=True)


TRUNCATED = [0, 5, 8]  # rows without EOS


def _with_eos(data: dict) -> dict:
    """``data`` where every completion but those of ``TRUNCATED`` ends with EOS (TRL's truncation test)."""
    ids = [c if i in TRUNCATED else c[:-1] + [EOS] for i, c in enumerate(data["completion_ids"])]
    truncated = torch.zeros(B, dtype=torch.bool)
    truncated[TRUNCATED] = True
    return {**data, "completion_ids": ids, "is_truncated": truncated}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(_lt("dapo", beta=0.04), id="dapo"),
        pytest.param(_lt("grpo", importance_sampling_level="sequence"), id="gspo"),
        pytest.param(_lt("bnpo", top_entropy_quantile=0.3), id="bnpo-entropy_mask"),
    ],
)
def test_grpo_mask_truncated_completions_matches_trl(case):
    """``mask_truncated_completions`` (DAPO): completions without EOS get no loss and leave the token count. The
    ``entropy`` metric is left out: TRL's is over the kept completions (it zeroes their ``completion_mask``), ours
    over every completion token (``buf["completion_mask"]``), a logging convention."""
    data = _with_eos(_data())
    case = {**case, "mask_truncated_completions": True}
    o, t = ours(data, case), trl_grpo(data, case)
    assert int(t.inputs["completion_mask"][TRUNCATED].sum()) == 0
    o.metrics.pop("entropy"), t.metrics.pop("entropy")
    _compare(o, t, need_entropy=False)


def test_grpo_entropy_metric_with_truncated_completions_matches_trl():
    """With ``mask_truncated_completions`` the logged entropy is averaged over the kept completions' tokens, as TRL's
    (it zeroes the truncated rows' completion mask); it was over every completion token (1.3141 vs TRL's 1.2075)."""
    data = _with_eos(_data())
    case = _lt("dapo", mask_truncated_completions=True)
    _close(ours(data, case).metrics["entropy"], trl_grpo(data, case).metrics["entropy"], "metric entropy")


@pytest.mark.parametrize(
    "option",
    [
        pytest.param("kl=k1", id="kl_k1"),
        pytest.param("kl=k2", id="kl_k2"),
        pytest.param("reward_clip_range with advantage=grpo", id="grpo_reward_clip"),
    ],
)
def test_options_trl_grpo_lacks(option):
    pytest.skip(
        f"{option}: not in TRL 1.16's GRPOTrainer (its KL term is k3 only; reward_clip_range and "
        "normalize_advantages are RLOOTrainer options, compared in test_rloo_*), nothing to compare against"
    )


# ---------------------------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize(
    "case",
    [
        pytest.param({"scale_rewards": "group"}, id="group"),
        pytest.param({"scale_rewards": "batch"}, id="batch"),
        pytest.param({"scale_rewards": "none"}, id="none"),
        pytest.param({"scale_rewards": "group", "reward_weights": [0.7, -1.3]}, id="group-weights"),
        pytest.param({"multi_objective_aggregation": "normalize_then_sum"}, id="gdpo"),
        pytest.param({"multi_objective_aggregation": "normalize_then_sum", "reward_weights": [2.0, 0.25]}, id="gdpo-w"),
    ],
)
def test_grpo_advantages_edge_cases_match_trl(case):
    """None rewards (NaN: out of the baseline, advantage 0), a group with one scorable completion (NaN std), a group
    of equal rewards (std 0), per-function weights; the loss follows."""
    data = _data()
    per_func = _edge_rewards()
    case = _lt("dapo", **case)
    o, t = ours(data, case, per_func=per_func), trl_grpo(data, case, per_func=per_func)
    _compare(o, t)
    assert float(t.advantages[1]) == 0.0  # unscorable
    if case.get("multi_objective_aggregation") != "normalize_then_sum" and case.get("scale_rewards") == "group":
        assert torch.all(t.advantages[4:8] == 0)  # a single scorable completion: NaN std -> 0


@pytest.mark.parametrize(
    "case",
    [
        pytest.param({}, id="default_beta"),
        pytest.param({"beta": 0.0}, id="beta0"),
        pytest.param({"beta": 0.1, "normalize_advantages": True}, id="normalized"),
        pytest.param({"reward_clip_range": (-0.8, 0.9)}, id="reward_clip"),
        pytest.param({"beta": 0.0, "epsilon_high": 0.28, "reward_weights": [0.7, -1.3]}, id="clip_higher-weights"),
    ],
)
@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("edge", [False, True], ids=["rewards", "edge_rewards"])
def test_rloo_matches_trl(case, micro_batches, edge):
    """``advantage: rloo`` + ``loss_type: rloo`` against TRL's RLOOTrainer: leave-one-out advantages of the reward
    minus ``beta * sum_t (log pi_old - log pi_ref)``, one importance ratio per sequence."""
    data = _data()
    per_func = _edge_rewards() if edge else None
    o = ours(data, case, micro_batches=micro_batches, per_func=per_func, rloo=True)
    t = trl_rloo(data, case, micro_batches=micro_batches, per_func=per_func)
    _compare(o, t)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_rloo_advantages_with_grpo_loss_match_trl(loss_type):
    """``advantage: rloo`` with a GRPO loss: the advantages are TRL RLOO's (its beta is a reward penalty; ours, with
    a GRPO loss, is the per-token KL term, so RLOO's is compared at beta = 0)."""
    data = _data()
    for per_func in (data["per_func"], _edge_rewards()):
        for normalize in (False, True):
            case = {"normalize_advantages": normalize}
            o = ours(data, {**_lt(loss_type), **case, "advantage": "rloo"}, per_func=per_func)
            t = trl_rloo(data, {**case, "beta": 0.0}, per_func=per_func)
            _close(o.advantages, t.advantages, "rloo advantages")


# ---------------------------------------------------------------------------------------------------- helpers
def test_masks_and_weights_match_trl_helpers():
    """The per-function helpers against TRL's: the high-entropy mask (quantiles 0, 0.3, 1; ties), the off-policy
    sequence mask (with NaN sampling log-probs), VESPO's gamma weights (with extreme ratios), ``nanstd``."""
    data = _data()
    mask, logps = data["mask"], data["logps"]
    t = object.__new__(trl_grpo_module.GRPOTrainer)
    t.accelerator = _Accelerator()
    ent = data["entropies"].clone()
    ent[0, :3] = 1.0  # ties at the threshold
    ent[4, :5] = 1.0
    for q in (0.0, 0.3, 0.5, 1.0):
        theirs = t.get_high_entropy_mask(ent, mask, 1 - q)
        assert torch.equal(high_entropy_mask(ent, mask, q), theirs), q
    assert 0 < int(t.get_high_entropy_mask(ent, mask, 0.7).sum()) < int(mask.sum())

    adv = torch.linspace(-1, 1, B, dtype=F64).unsqueeze(1)
    sampling = data["old"].clone()
    sampling[3, 0] = NAN
    sampling[6, 1] = NAN
    for threshold in (0.0, 0.05, 0.2):
        theirs = trl_grpo_module.GRPOTrainer.get_off_policy_mask(adv, logps, sampling, mask, threshold)
        ours_mask = off_policy_sequence_mask(adv, logps, sampling, mask, threshold)
        assert torch.equal(ours_mask.to(theirs.dtype), theirs), threshold

    log_ratio = data["old"] - logps
    log_ratio[1, :3] = 30.0  # beyond the per-token and sequence clamps
    log_ratio[7, :2] = -25.0
    for kw in ({}, {"k_pos": 1.5, "lambda_pos": 0.5, "k_neg": 4.0, "lambda_neg": 0.0}):
        theirs = trl_grpo_module.GRPOTrainer.get_gamma_weights(adv, log_ratio, mask, None, **kw)
        _close(vespo_weights(adv, log_ratio, mask, **kw), theirs, f"vespo weights {kw}")

    x = _edge_rewards()[:, 0].reshape(-1, G)
    a, b = nanstd(x, dim=1), trl_nanstd(x, dim=1)
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    _close(a.nan_to_num(), b.nan_to_num(), "nanstd")


def test_inputs_are_not_degenerate():
    """The shared inputs exercise what the comparisons claim: padding in most rows, advantages of both signs, ratios
    that clip on both sides (token and sequence level), an off-policy mask that drops some but not all negative
    sequences, a strict entropy subset, VESPO weights != 1, CISPO caps, and gradients that vanish exactly at padding."""
    data = _data()
    mask = data["mask"].bool()
    assert int((~mask).any(1).sum()) >= 6 and int(mask.all(1).sum()) >= 2
    t = trl_grpo(data, _lt("dapo"))
    adv = t.advantages
    assert int((adv > 0).sum()) >= 3 and int((adv < 0).sum()) >= 3 and int((adv != 0).sum()) == B - 1
    log_ratio = data["logps"] - data["old"]
    ratio = log_ratio.exp()[mask]
    assert float(((ratio < 0.8) | (ratio > 1.2)).double().mean()) > 0.2
    seq_ratio = ((log_ratio * mask).sum(1) / mask.sum(1)).exp()
    assert int(((seq_ratio < 0.8) | (seq_ratio > 1.2)).sum()) >= 2
    assert bool(((seq_ratio > 1.2) & (adv < 0)).any())  # the sequence-level delta = 1.2 cases bind
    for level in ("token", "sequence"):
        m = trl_grpo(data, _lt("grpo", importance_sampling_level=level)).metrics
        assert 0 < m["clip_ratio/low_mean"] < 1 and 0 < m["clip_ratio/high_mean"] < 1, (level, m)
    opsm = trl_grpo_module.GRPOTrainer.get_off_policy_mask(
        adv.unsqueeze(1), data["logps"], data["old"], data["mask"], 0.05
    ).squeeze(1)
    negative = adv < 0
    assert 0 < int((opsm[negative] == 0).sum()) < int(negative.sum())
    tt = object.__new__(trl_grpo_module.GRPOTrainer)
    tt.accelerator = _Accelerator()
    kept = tt.get_high_entropy_mask(data["entropies"], data["mask"], 0.7)
    assert 0 < int(kept.sum()) < int(mask.sum())
    assert 0 < trl_grpo(data, _lt("cispo")).metrics["cispo_clip_ratio"] < 1
    phi = trl_grpo_module.GRPOTrainer.get_gamma_weights(adv.unsqueeze(1), log_ratio, data["mask"], None)
    assert float((phi - 1).abs().min()) > 1e-3
    grad = t.grad
    assert torch.all(grad[~mask] == 0) and int((grad[mask] != 0).sum()) >= int(mask.sum()) // 2  # some clip
    kl = trl_grpo(data, _lt("dapo", beta=0.04)).metrics["kl"]
    assert kl > 1e-3

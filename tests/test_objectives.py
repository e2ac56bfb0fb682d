"""The objective registry and every objective's path through a real `Trainer` on a tiny Qwen3-MoE student.

Expected values are worked out by hand from the trainer's own pi_old (`Trainer.logprobs`) with plain
Python loops over the response positions, never with the functions under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_trainer import cfg_for, make_samples, weights
from tiny_models import save_tiny_models

from mopd.batch import build_batch
from mopd.losses import pg_loss
from mopd.objectives import (
    ADVANTAGES,
    OBJECTIVES,
    LossInputs,
    get_objective,
    pg_objective,
    register_objective,
)
from mopd.trainer import Trainer

CLIP = 10.0  # algorithm.advantage_clip default


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return save_tiny_models(d), d


@pytest.fixture(scope="module")
def pool(models):
    """Eight on-policy samples with teacher log-probs and the teacher's whole distribution (k = V = 64)."""
    tok, d = models
    return make_samples(tok, d / "teacher", n=8, top_k=64)


@pytest.fixture
def samples(pool):
    return copy.deepcopy(pool)


def rows(b):
    """Per row: the predicting positions of its response tokens."""
    return [b.mask_BT[i].nonzero().squeeze(-1).tolist() for i in range(b.size)]


def hand_pg_loss(b, old, adv_of):
    """-mean over rows of (1/|y|) sum_t A_t log pi(y_t), with w = 1 (on-policy samples: IcePop keeps all)."""
    per_row = [sum(adv_of(i, t) * old[i, t].item() for t in pos) / len(pos) for i, pos in enumerate(rows(b))]
    return -sum(per_row) / len(per_row)


def mopd_adv(b, old):
    return lambda i, t: max(-CLIP, min(CLIP, b.teacher_logprobs_BT[i, t].item() - old[i, t].item()))


# -- the registry ----------------------------------------------------------------------------------------

FLAGS = {  # name: (advantage, needs_teacher_scores, needs_teacher_topk, teacher_samples, corrected)
    "pg": ("mopd", True, False, False, True),
    "reverse_kl": ("mopd", True, True, False, True),
    "mixed": ("mopd", True, True, False, True),
    "orm": ("orm", False, False, False, True),
    "sft": ("none", False, False, True, False),
}


def test_every_objective_is_registered_with_its_flags():
    assert set(OBJECTIVES) == set(FLAGS)
    for name, flags in FLAGS.items():
        o = get_objective(name)
        assert o.name == name
        assert (o.advantage, o.needs_teacher_scores, o.needs_teacher_topk, o.teacher_samples, o.corrected) == flags
        assert o.estimator is ADVANTAGES[o.advantage]
    assert get_objective("reverse_kl") is OBJECTIVES["reverse_kl"]
    # The token-mean loss metrics each objective emits are declared with it (the trainer weighs them by tokens).
    assert OBJECTIVES["mixed"].token_means == OBJECTIVES["pg"].token_means | OBJECTIVES["reverse_kl"].token_means
    assert "distillation/reverse_kl" in OBJECTIVES["reverse_kl"].token_means and not OBJECTIVES["sft"].token_means


def test_an_objective_naming_an_unregistered_advantage_is_refused():
    with pytest.raises(ValueError, match="advantage 'gae' is not registered"):
        register_objective("test_gae_objective", advantage="gae")(lambda x, a: (x.logprobs_BT.sum(), {}))
    assert "test_gae_objective" not in OBJECTIVES


def test_unknown_objective_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown objective 'grpo'") as e:
        get_objective("grpo")
    for name in FLAGS:
        assert repr(name) in str(e.value)


def test_duplicate_registration_is_refused_and_keeps_the_original():
    before = dict(OBJECTIVES)
    with pytest.raises(ValueError, match="'pg' is already registered"):
        register_objective("pg", advantage="none")(lambda x, a: (x.logprobs_BT.sum(), {}))
    assert OBJECTIVES == before and OBJECTIVES["pg"].loss is pg_objective


def test_an_objective_registered_here_trains_in_the_trainer(models, samples):
    """Registering is all it takes for the Trainer: its flags pick the advantage and the correction."""
    tok, d = models
    name = "test_half_sft_objective"
    seen: list[LossInputs] = []

    def half_nll(x: LossInputs, a):
        seen.append(x)
        loss, _ = pg_loss(x.logprobs_BT, x.mask_BT, None, x.mask_BT)
        return 0.5 * loss, {"test/custom": 1.0}

    register_objective(name, advantage="none", needs_teacher_scores=False, corrected=False)(half_nll)
    try:
        cfg = cfg_for(d, f"algorithm.objective={name}", "trainer.micro_batch_size=64")
        tr = Trainer(cfg, cfg.student.path)
        assert tr.objective is OBJECTIVES[name]
        b = build_batch(samples, tok.pad_token_id)
        old = tr.logprobs(b)
        m = tr.step(b)
    finally:
        OBJECTIVES.pop(name, None)
    assert name not in OBJECTIVES
    assert m["test/custom"] == 1.0
    assert m["actor/loss"] == pytest.approx(0.5 * hand_pg_loss(b, old, lambda i, t: 1.0), rel=1e-5)
    (x,) = seen  # one pass, one micro-batch
    assert x.weights_BT is None  # corrected=False: no IcePop weights
    assert torch.equal(x.advantages_BT, b.mask_BT)  # advantage "none": A = 1 on response tokens
    assert torch.equal(x.old_logprobs_BT, old)
    assert tuple(x.logprobs_BTV.shape) == (*b.mask_BT.shape, 64)
    assert not any(k.startswith(("icepop/", "rollout_corr/", "mopd/teacher_kl")) for k in m)


def test_a_toy_objective_is_one_registration_its_flags_reach_config_and_metric_aggregation(models, samples):
    """Adding an objective touches one module: registered here with its own advantage estimator, it is accepted
    by `load_config`, validated by its flags (it needs no teacher; its estimator uses the outcome, so rollout.n
    >= 2), and the metrics it declares as token means are averaged over the batch's tokens across micro-batches
    while its other metrics are averaged over rows."""
    import torch

    from mopd.config import ConfigError, load_config
    from mopd.objectives import register_advantage

    tok, d = models
    estimator, name = "test_outcome_only", "test_length_objective"

    def length_metrics(x: LossInputs, a):
        valid = x.mask_BT.bool()
        pos = torch.arange(valid.shape[1]).expand_as(valid)[valid].float()
        loss, _ = pg_loss(x.logprobs_BT, x.advantages_BT, x.weights_BT, x.mask_BT)
        return loss, {"test/position": pos.mean().item(), "test/row_tokens": valid.sum(1).float().mean().item()}

    register_advantage(estimator, uses_outcome=lambda a: True)(lambda x, a: x.mask_BT.float() * x.outcome_B[:, None])
    register_objective(name, advantage=estimator, needs_teacher_scores=False,
                       token_means=("test/position",))(length_metrics)
    try:
        with pytest.raises(ConfigError, match=f"rollout.n.*>= 2 with algorithm.objective={name}"):
            load_config("configs/quickstart.yaml", [f"algorithm.objective={name}", "rollout.n=1"])
        cfg = load_config(None, [f"algorithm.objective={name}", "rollout.n=2", "trainer.micro_batch_size=3",
                                 f"student.path={d}/student", f"data.train_files=[{d}/none.jsonl]",
                                 f"data.eval_files=[{d}/none.jsonl]"])
        assert not cfg.teachers  # no teacher: its flags say it needs none
        for i, (s, g, r) in enumerate(zip(samples, GROUPS, SCORES, strict=True)):
            s.group, s.score = g, r
            keep = 2 + i % 4  # responses of 2-5 tokens: micro-batches of unequal token counts
            s.sample.response_ids, s.sample.rollout_logprobs = s.sample.response_ids[:keep], s.sample.rollout_logprobs[:keep]
            s.teacher_logprobs = s.teacher_logprobs[:keep]
            if s.teacher_topk_ids is not None:
                s.teacher_topk_ids, s.teacher_topk_logprobs = s.teacher_topk_ids[:keep], s.teacher_topk_logprobs[:keep]
        b = build_batch(samples, tok.pad_token_id)
        m = Trainer(cfg, cfg.student.path).step(b)
    finally:
        OBJECTIVES.pop(name, None)
        ADVANTAGES.pop(estimator, None)
    valid = b.mask_BT.bool()
    assert b.size > 3 and len({int(n) for n in valid.sum(1)}) > 1  # several micro-batches of unequal token counts
    whole_position = torch.arange(valid.shape[1]).expand_as(valid)[valid].float().mean().item()
    assert m["test/position"] == pytest.approx(whole_position, rel=1e-6)  # by tokens
    assert m["test/row_tokens"] == pytest.approx(valid.sum(1).float().mean().item(), rel=1e-6)  # by rows
    assert m["mopd/advantage/max"] > 0 > m["mopd/advantage/min"]  # the outcome advantage reached the loss
    assert not any(k.startswith("mopd/teacher_kl") for k in m)


# -- the loss paths --------------------------------------------------------------------------------------


def test_pg_is_reinforce_on_the_mopd_advantage(models, samples):
    tok, d = models
    b = build_batch(samples, tok.pad_token_id)
    tr = Trainer(cfg_for(d, "algorithm.objective=pg"), str(d / "student"))
    old = tr.logprobs(b)
    m = tr.step(b)
    assert m["actor/pg_loss"] == pytest.approx(hand_pg_loss(b, old, mopd_adv(b, old)), rel=1e-5)
    assert m["actor/loss"] == pytest.approx(m["actor/pg_loss"], rel=1e-6)
    # One optimizer step per batch: no PPO clip, no clip metrics, no KL term.
    assert "actor/pg_clipfrac" not in m and "actor/ppo_kl" not in m
    assert not any(k.startswith("distillation/") for k in m)


def test_ppo_epochs_take_the_clipped_path(models, samples):
    """ppo_epochs=2: the second pass sees the weights after the first, i.e. exactly what a one-epoch trainer
    holds after its step; its loss and clip metrics are PPO's, worked out here from those log-probs."""
    tok, d = models
    b = build_batch(samples, tok.pad_token_id)
    eps = 0.05
    two = Trainer(cfg_for(d, "algorithm.ppo_epochs=2", f"algorithm.ppo_clip={eps}"), str(d / "student"))
    one = Trainer(cfg_for(d, "algorithm.ppo_epochs=1"), str(d / "student"))
    old = two.logprobs(b)
    m = two.step(b)
    one.step(b)
    new = one.logprobs(b)  # the weights the second PPO pass ran with
    adv = mopd_adv(b, old)
    per_row, clipped, kl, n = [], 0, 0.0, 0
    for i, pos in enumerate(rows(b)):
        row = 0.0
        for t in pos:
            a, r = adv(i, t), math.exp(new[i, t].item() - old[i, t].item())
            s1, s2 = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
            row += max(s1, s2)
            clipped += s2 > s1
            kl += old[i, t].item() - new[i, t].item()
            n += 1
        per_row.append(row / len(pos))
    assert m["actor/pg_loss"] == pytest.approx(sum(per_row) / len(per_row), rel=1e-3, abs=1e-6)
    assert m["actor/pg_clipfrac"] == pytest.approx(clipped / n, abs=1.5 / n)
    assert m["actor/ppo_kl"] == pytest.approx(kl / n, rel=1e-3, abs=1e-7)
    assert m["actor/pg_clipfrac"] > 0 and m["actor/ppo_kl"] != 0  # the first pass moved the policy
    assert m["actor/loss"] == pytest.approx(m["actor/pg_loss"], rel=1e-6)


def test_mixed_is_pg_plus_kl_coef_times_reverse_kl(models, samples):
    tok, d = models
    b = build_batch(samples, tok.pad_token_id)
    path = str(d / "student")
    topk = ("algorithm.teacher_top_k=-1",)
    mixed = Trainer(cfg_for(d, "algorithm.objective=mixed", "algorithm.kl_coef=0.5", *topk), path).step(b)
    pg = Trainer(cfg_for(d, "algorithm.objective=pg"), path).step(b)
    kl = Trainer(cfg_for(d, "algorithm.objective=reverse_kl", *topk), path).step(b)
    assert mixed["actor/loss"] == pytest.approx(mixed["actor/pg_loss"] + 0.5 * mixed["distillation/loss"], rel=1e-5)
    # Each part is what the objective alone computes on the same weights and batch.
    assert mixed["actor/pg_loss"] == pytest.approx(pg["actor/pg_loss"], rel=1e-5)
    assert mixed["distillation/loss"] == pytest.approx(kl["distillation/loss"], rel=1e-5)
    assert mixed["distillation/reverse_kl"] == pytest.approx(kl["distillation/reverse_kl"], rel=1e-5)
    assert kl["actor/loss"] == pytest.approx(kl["distillation/loss"], rel=1e-6) and "actor/pg_loss" not in kl
    assert kl["distillation/loss"] > 0


@pytest.mark.parametrize("objective", ["reverse_kl", "mixed"])
def test_kl_objectives_without_teacher_topk_say_what_to_set(models, samples, objective):
    tok, d = models
    for s in samples:
        s.teacher_topk_ids, s.teacher_topk_logprobs = None, None
    b = build_batch(samples, tok.pad_token_id)
    assert b.teacher_topk_ids_BTK is None
    tr = Trainer(cfg_for(d, f"algorithm.objective={objective}", "algorithm.teacher_top_k=-1"), str(d / "student"))
    before = weights(tr)
    with pytest.raises(ValueError, match=rf"objective={objective} needs the teachers' top-k.*algorithm\.teacher_top_k"):
        tr.step(b)
    assert all(torch.equal(v, tr.state_dict()[k]) for k, v in before.items())


# Groups of 3, 3 and 2 with verifier scores; GRPO with the Bessel std, worked out by hand:
#   group 0: scores (1, 0, 0): mean 1/3, std sqrt((4/9 + 1/9 + 1/9) / 2) = 1/sqrt(3) -> (2/sqrt3, -1/sqrt3, -1/sqrt3)
#   group 1: (2, 2, 2): a tie -> 0
#   group 2: (0, 1): mean 1/2, std 1/sqrt(2) -> (-1/sqrt2, 1/sqrt2)
GROUPS = [0, 0, 0, 1, 1, 1, 2, 2]
SCORES = [1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0, 1.0]
ORM = [2 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), 0.0, 0.0, 0.0, -1 / math.sqrt(2), 1 / math.sqrt(2)]


def with_scores(samples):
    for s, g, r in zip(samples, GROUPS, SCORES, strict=True):
        s.group, s.score = g, r
    return samples


def test_alpha_orm_adds_the_group_normalised_outcome(models, samples):
    tok, d = models
    samples = with_scores(samples)
    samples[0].teacher_logprobs[1] = -50.0  # far below the student's: the advantage there is clamped at -10
    b = build_batch(samples, tok.pad_token_id)
    tr = Trainer(cfg_for(d, "algorithm.objective=pg", "algorithm.alpha_orm=0.5", "rollout.n=2"), str(d / "student"))
    old = tr.logprobs(b)
    metrics: dict[str, float] = {}
    adv = tr.advantages(b, old, metrics)
    expected = torch.zeros_like(adv)
    mopd = mopd_adv(b, old)
    for i, pos in enumerate(rows(b)):
        for t in pos:
            expected[i, t] = mopd(i, t) + 0.5 * ORM[i]
    assert torch.allclose(adv, expected, atol=1e-5)
    assert adv[0, rows(b)[0][1]].item() == pytest.approx(-CLIP + 0.5 * ORM[0], abs=1e-5)
    assert metrics["mopd/advantage/max"] == pytest.approx(expected[b.mask_BT.bool()].max().item(), abs=1e-5)
    assert "mopd/teacher_kl" in metrics and "mopd/teacher_kl/rev" in metrics


def test_orm_trains_on_outcomes_without_any_teacher(models, samples):
    tok, d = models
    for s in with_scores(samples):
        s.teacher, s.teacher_logprobs, s.teacher_topk_ids, s.teacher_topk_logprobs = "", [], None, None
    b = build_batch(samples, tok.pad_token_id)
    tr = Trainer(cfg_for(d, "algorithm.objective=orm", "rollout.n=2"), str(d / "student"))
    old = tr.logprobs(b)
    metrics: dict[str, float] = {}
    adv = tr.advantages(b, old, metrics)
    assert torch.allclose(adv, torch.tensor(ORM)[:, None] * b.mask_BT, atol=1e-5)
    assert not any(k.startswith("mopd/teacher_kl") for k in metrics)
    m = tr.step(b)
    assert m["actor/pg_loss"] == pytest.approx(hand_pg_loss(b, old, lambda i, t: ORM[i]), rel=1e-4)
    assert not any(k.startswith("mopd/teacher_kl") for k in m)


def test_sft_trains_on_teacher_samples_without_correction(models, samples):
    """The teacher's samples were never drawn by the student's engine: their mu (here -30, far from pi_old)
    must not mask them as it would for an on-policy objective."""
    tok, d = models
    for s in samples:
        s.teacher = "t"
        s.sample.rollout_logprobs = [-30.0] * len(s.sample.response_ids)
    b = build_batch(samples, tok.pad_token_id)
    tr = Trainer(cfg_for(d, "algorithm.objective=sft"), str(d / "student"))
    old = tr.logprobs(b)
    metrics: dict[str, float] = {}
    assert tr.correction(b, old, metrics) is None and metrics == {}
    assert torch.equal(tr.advantages(b, old, metrics), b.mask_BT)
    m = tr.step(b)
    nll = hand_pg_loss(b, old, lambda i, t: 1.0)
    assert m["actor/sft_loss"] == pytest.approx(nll, rel=1e-5) and m["actor/loss"] == pytest.approx(nll, rel=1e-5)
    assert not any(k.startswith(("icepop/", "rollout_corr/", "training/rollout_probs")) for k in m)
    # The same batch under an on-policy objective: IcePop drops every token (k = pi_old / mu >> high).
    pg = Trainer(cfg_for(d, "algorithm.objective=pg"), str(d / "student"))
    w = pg.correction(b, pg.logprobs(b), {})
    assert w is not None and w[b.mask_BT.bool()].eq(0).all()

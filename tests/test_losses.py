"""mopd/losses.py: policy-gradient and reverse-KL losses, by hand, by property, and against verl."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from mopd.losses import pg_loss, reverse_kl_loss, reverse_kl_per_token, seq_mean_token_mean, token_entropy

# --------------------------------------------------------------------------------------------------
# helpers


def _verl_core_algos():
    return pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl (test oracle) not importable in this venv")


def _verl_fsdp_distill_losses():
    """verl's ``trainer/distillation/fsdp/losses.py``, loaded by file.

    Importing it as a package module runs ``verl/trainer/distillation/__init__.py``, which pulls verl's
    dataset stack (``datasets``, pyarrow, pandas) for nothing this test uses; the file itself only needs
    ``verl.utils.ulysses`` and ``verl.workers.config``.
    """
    verl = pytest.importorskip("verl", reason="verl (test oracle) not importable in this venv")
    path = Path(verl.__file__).parent / "trainer" / "distillation" / "fsdp" / "losses.py"
    spec = importlib.util.spec_from_file_location("_verl_fsdp_distill_losses", path)
    if spec is None or spec.loader is None:
        pytest.skip(f"verl distillation losses file not found at {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the venv
        pytest.skip(f"verl distillation losses not importable: {exc}")
    return module


def _full_reverse_kl(student_logits, teacher_logp):
    """Exact sum_v p_s (log p_s - log p_t) per position, written out independently."""
    ls = torch.log_softmax(student_logits.double(), -1)
    return (ls.exp() * (ls - teacher_logp.double())).sum(-1)


def _random_distill(seed: int, B: int = 3, T: int = 4, V: int = 11, K: int = 4):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 1.5
    teacher_full = torch.log_softmax(torch.randn(B, T, V, generator=g) * 1.5, -1)
    top = teacher_full.topk(K, dim=-1)
    return student, teacher_full, top.indices, top.values


# --------------------------------------------------------------------------------------------------
# aggregation


def test_seq_mean_token_mean_hand():
    loss = torch.tensor([[1.0, 3.0, 100.0], [4.0, 100.0, 100.0], [100.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # seq 0: 2, seq 1: 4, seq 2 empty (left out): (2 + 4) / 2
    assert seq_mean_token_mean(loss, mask).item() == pytest.approx(3.0)


def test_seq_mean_token_mean_agrees_with_verl():
    core_algos = _verl_core_algos()
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 7, generator=g)
    mask = (torch.rand(6, 7, generator=g) > 0.4).float()
    mask[:, 0] = 1
    ref = core_algos.agg_loss(loss, mask, "seq-mean-token-mean")
    torch.testing.assert_close(seq_mean_token_mean(loss, mask), ref)


# --------------------------------------------------------------------------------------------------
# pg_loss


def test_pg_loss_reinforce_hand_values():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, -3.0]])
    adv = torch.tensor([[1.0, -0.5, 9.0], [2.0, 9.0, 9.0]])
    w = torch.tensor([[1.0, 2.0, 9.0], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, metrics = pg_loss(logp, adv, w, mask)
    seq0 = -(1.0 * 1.0 * -1.0 + 2.0 * -0.5 * -2.0) / 2
    seq1 = -(0.5 * 2.0 * -0.2) / 1
    assert loss.item() == pytest.approx((seq0 + seq1) / 2)
    assert metrics["actor/pg_loss"] == pytest.approx(loss.item())
    # weights None == all ones
    loss_1, _ = pg_loss(logp, adv, None, mask)
    loss_1b, _ = pg_loss(logp, adv, torch.ones_like(w), mask)
    assert loss_1.item() == pytest.approx(loss_1b.item())


def test_pg_loss_masked_positions_get_no_gradient_even_with_nan():
    nan = float("nan")
    logp = torch.tensor([[-1.0, nan, -0.5]], requires_grad=True)
    adv = torch.tensor([[1.0, nan, 2.0]])
    w = torch.tensor([[1.0, nan, 1.0]])
    mask = torch.tensor([[1, 0, 1]])
    for kwargs in ({}, {"old_logprobs_BT": torch.tensor([[-1.0, nan, -0.4]]), "clip_eps": 0.2}):
        logp.grad = None
        loss, _ = pg_loss(logp, adv, w, mask, **kwargs)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(logp.grad).all()
        assert logp.grad[0, 1] == 0.0
        assert logp.grad[0, 0] != 0.0


def test_pg_loss_all_masked_is_zero_with_defined_grad():
    logp = torch.randn(2, 3, requires_grad=True)
    loss, _ = pg_loss(logp, torch.randn(2, 3), None, torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros(2, 3))


def test_pg_loss_empty_sequence_does_not_dilute():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    adv = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    one, _ = pg_loss(logp[:1], adv[:1], None, torch.ones(1, 2))
    two, _ = pg_loss(logp, adv, None, torch.tensor([[1, 1], [0, 0]]))
    assert one.item() == pytest.approx(two.item())


def test_pg_loss_weights_and_advantages_are_detached():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 2.0]], requires_grad=True)
    w = torch.tensor([[1.0, 0.5]], requires_grad=True)
    loss, _ = pg_loss(logp, adv, w, torch.ones(1, 2))
    loss.backward()
    assert adv.grad is None and w.grad is None
    # dL/dlogp_t = -w_t A_t / |y| / n_seq
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -0.5]]))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_pg_loss_sgd_step_moves_logprob_with_advantage_sign(sign):
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 6, requires_grad=True)
    tokens = torch.tensor([[2, 4, 1]])
    mask = torch.tensor([[1, 1, 0]])
    adv = torch.tensor([[sign, sign, 5.0]])

    def token_logp():
        return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    before = token_logp().detach()
    loss, _ = pg_loss(token_logp(), adv, None, mask)
    loss.backward()
    with torch.no_grad():
        logits -= 0.1 * logits.grad
    after = token_logp().detach()
    moved = (after - before)[0, :2]
    assert torch.all(moved * sign > 0)
    assert after[0, 2] == before[0, 2]  # masked token untouched


def test_pg_loss_zero_weight_token_gets_no_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = pg_loss(logp, torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]]), torch.ones(1, 2))
    loss.backward()
    assert logp.grad[0, 0] == 0.0 and logp.grad[0, 1] != 0.0


def test_ppo_gradient_equals_reinforce_at_ratio_one():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 5, generator=g) - 1
    adv = torch.randn(3, 5, generator=g)
    w = torch.rand(3, 5, generator=g) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    grads = []
    for kwargs in ({}, {"old_logprobs_BT": base.clone(), "clip_eps": 0.2}):
        logp = base.clone().requires_grad_(True)
        loss, _ = pg_loss(logp, adv, w, mask, **kwargs)
        loss.backward()
        grads.append(logp.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_ppo_clipping_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    loss, m = pg_loss(logp, adv, None, torch.ones(1, 4), old_logprobs_BT=old, clip_eps=0.2)
    # token 0: r=1.5, A>0 -> clipped at 1.2; token 1: r=0.5, A<0 -> clipped at 0.8 (-A*0.8 = 0.8)
    # token 2: r=1.1 inside; token 3: r=0.5, A>0 -> unclipped (min keeps -0.5)
    expected = (-1.2 + 0.8 - 1.1 - 0.5) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["actor/pg_clipfrac"] == pytest.approx(2 / 4)
    assert m["actor/ppo_kl"] == pytest.approx(-sum(math.log(x) for x in (1.5, 0.5, 1.1, 0.5)) / 4, rel=1e-5)
    loss.backward()
    assert logp.grad[0, 0] == 0.0 and logp.grad[0, 1] == 0.0
    assert logp.grad[0, 2] != 0.0 and logp.grad[0, 3] != 0.0


def test_pg_loss_upcasts_bf16():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.bfloat16, requires_grad=True)
    loss, _ = pg_loss(logp, torch.tensor([[1.0, 0.5, 2.0]]), None, torch.ones(1, 3))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-(-1.0 - 1.0 - 1.0) / 3)
    loss.backward()
    assert logp.grad is not None and logp.grad.dtype == torch.bfloat16


def test_pg_loss_argument_errors():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="old_logprobs"):
        pg_loss(x, x, None, x, clip_eps=0.2)
    with pytest.raises(ValueError, match="shape"):
        pg_loss(x, torch.zeros(1, 3), None, x)


class _VerlActorCfg:
    """The attributes verl's compute_policy_loss_vanilla reads from an ActorConfig."""

    clip_ratio = 0.2
    clip_ratio_low = None
    clip_ratio_high = 0.28
    global_batch_info: dict = {}

    def get(self, key, default=None):
        return {"clip_ratio_c": 3.0}.get(key, default)


def test_ppo_agrees_with_verl_vanilla_policy_loss():
    core_algos = _verl_core_algos()
    g = torch.Generator().manual_seed(2)
    B, T = 5, 8
    old = -torch.rand(B, T, generator=g) * 3
    base = old + 0.4 * torch.randn(B, T, generator=g)
    adv = 2 * torch.randn(B, T, generator=g)
    w = torch.rand(B, T, generator=g) * 2
    lengths = torch.tensor([8, 3, 1, 6, 5])
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()

    lp_verl = base.clone().requires_grad_(True)
    loss_verl, m_verl = core_algos.compute_policy_loss_vanilla(
        old, lp_verl, adv, mask, loss_agg_mode="seq-mean-token-mean", config=_VerlActorCfg(), rollout_is_weights=w)
    loss_verl.backward()
    lp = base.clone().requires_grad_(True)
    loss, m = pg_loss(lp, adv, w, mask, old_logprobs_BT=old, clip_eps=0.2, clip_eps_high=0.28, dual_clip_c=3.0)
    loss.backward()
    assert 0 < m["actor/pg_clipfrac"] < 1
    torch.testing.assert_close(loss, loss_verl)
    torch.testing.assert_close(lp.grad, lp_verl.grad)
    assert m["actor/pg_clipfrac"] == pytest.approx(m_verl["actor/pg_clipfrac"], abs=1e-6)
    assert m["actor/ppo_kl"] == pytest.approx(m_verl["actor/ppo_kl"], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# reverse KL


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_full_vocab_topk_equals_exact_reverse_kl(mode):
    student, teacher_full, _, _ = _random_distill(3)
    B, T, V = student.shape
    ids = torch.arange(V).expand(B, T, V)
    kl, s_mass, t_mass = reverse_kl_per_token(student, ids, teacher_full, topk_mode=mode)
    torch.testing.assert_close(kl.double(), _full_reverse_kl(student, teacher_full), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_mass, torch.ones(B, T))
    torch.testing.assert_close(t_mass, torch.ones(B, T))
    # ... and so is its gradient
    x = student.clone().requires_grad_(True)
    reverse_kl_per_token(x, ids, teacher_full, topk_mode=mode)[0].sum().backward()
    x_ref = student.clone().double().requires_grad_(True)
    _full_reverse_kl(x_ref, teacher_full).sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-4, atol=1e-6)
    # order of the top-k slots is irrelevant
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    kl_perm, _, _ = reverse_kl_per_token(student, ids[..., perm], teacher_full[..., perm], topk_mode=mode)
    torch.testing.assert_close(kl_perm, kl, rtol=1e-5, atol=1e-6)


def test_tempered_reverse_kl_is_the_kl_of_the_tempered_distributions():
    """kl_temperature T: the loss equals the plain loss on softmax(logits / T) of both sides (computed from the
    models' temperature-1 log-probs), and differs from the untempered one."""
    student_logits, teacher_full, _, _ = _random_distill(5)
    B, T, V = student_logits.shape
    ids = torch.arange(V).expand(B, T, V)
    mask = torch.ones(B, T)
    student, teacher = student_logits.log_softmax(-1), teacher_full.log_softmax(-1)
    for temp in (0.5, 0.7, 2.0):
        got, _ = reverse_kl_loss(student, ids, teacher, None, mask, temperature=temp)
        ref, _ = reverse_kl_loss((student_logits / temp).log_softmax(-1), ids, (teacher_full / temp).log_softmax(-1),
                                 None, mask)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        assert abs(float(got) - float(reverse_kl_loss(student, ids, teacher, None, mask)[0])) > 1e-3


def test_full_vocab_loss_agrees_with_verl_kl_divergence():
    fsdp_losses = _verl_fsdp_distill_losses()
    student, teacher_full, _, _ = _random_distill(4)
    B, T, V = student.shape
    ids = torch.arange(V).expand(B, T, V)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    # verl's kl_divergence(log_q, log_p) = sum p (log p - log q): reverse KL with p = student.
    per_tok = fsdp_losses.kl_divergence(log_q=teacher_full, log_p=torch.log_softmax(student, -1))
    for mode in ("tail", "renorm"):
        loss, m = reverse_kl_loss(student, ids, teacher_full, None, mask, topk_mode=mode)
        torch.testing.assert_close(loss, seq_mean_token_mean(per_tok, mask), rtol=1e-5, atol=1e-6)
        assert m["distillation/student_mass"] == pytest.approx(1.0, abs=1e-5)


def test_topk_modes_agree_with_verl_kl_divergence_on_coarsened_distributions():
    fsdp_losses = _verl_fsdp_distill_losses()
    student, _, ids, t_top = _random_distill(5, K=3)
    ls = torch.log_softmax(student, -1)
    s_top = ls.gather(-1, ids)
    # renorm: KL between the two distributions renormalised over the top-k set
    ref_renorm = fsdp_losses.kl_divergence(log_q=t_top - t_top.logsumexp(-1, keepdim=True),
                                           log_p=s_top - s_top.logsumexp(-1, keepdim=True))
    kl_renorm, _, _ = reverse_kl_per_token(student, ids, t_top, topk_mode="renorm")
    torch.testing.assert_close(kl_renorm, ref_renorm, rtol=1e-5, atol=1e-6)
    # tail: KL over the top-k set plus one bucket for everything else
    s_tail = torch.log1p(-s_top.exp().sum(-1, keepdim=True))
    t_tail = torch.log1p(-t_top.exp().sum(-1, keepdim=True))
    ref_tail = fsdp_losses.kl_divergence(log_q=torch.cat([t_top, t_tail], -1), log_p=torch.cat([s_top, s_tail], -1))
    kl_tail, s_mass, t_mass = reverse_kl_per_token(student, ids, t_top, topk_mode="tail")
    torch.testing.assert_close(kl_tail, ref_tail, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_mass, s_top.exp().sum(-1))
    torch.testing.assert_close(t_mass, t_top.exp().sum(-1))


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_reverse_kl_nonnegative_and_zero_iff_equal(mode):
    for seed in range(5):
        student, _, ids, t_top = _random_distill(10 + seed, K=2 + seed)  # K=1 renormalises to one point
        kl, _, _ = reverse_kl_per_token(student, ids, t_top, topk_mode=mode)
        assert torch.all(kl >= -1e-6)
        assert torch.all(kl > 1e-4)  # random distributions differ
    # student == teacher: zero, for top-k and for the full vocabulary
    student, _, _, _ = _random_distill(20)
    ls = torch.log_softmax(student, -1)
    top = ls.topk(4, -1)
    kl, _, _ = reverse_kl_per_token(student, top.indices, top.values, topk_mode=mode)
    torch.testing.assert_close(kl, torch.zeros_like(kl), rtol=0, atol=1e-6)


def test_tail_mode_is_a_lower_bound_of_the_full_kl():
    for k in (1, 3, 6, 10):
        student, teacher_full, ids, t_top = _random_distill(30 + k, K=k)
        kl_tail, _, _ = reverse_kl_per_token(student, ids, t_top, topk_mode="tail")
        assert torch.all(kl_tail.double() <= _full_reverse_kl(student, teacher_full) + 1e-5)


def test_tail_mode_sees_student_mass_outside_topk_renorm_does_not():
    V = 6
    teacher = torch.log(torch.tensor([0.5, 0.3, 0.05, 0.05, 0.05, 0.05]))
    ids = torch.tensor([[[0, 1]]])
    t_top = teacher[:2].view(1, 1, 2)
    # same shape on {0, 1} (ratio 5:3), but 60% vs 20% of the mass outside the teacher's top-2
    s_far = torch.log(torch.tensor([0.25, 0.15, 0.15, 0.15, 0.15, 0.15])).view(1, 1, V)
    s_near = torch.log(torch.tensor([0.5, 0.3, 0.05, 0.05, 0.05, 0.05])).view(1, 1, V)
    r_far, _, _ = reverse_kl_per_token(s_far, ids, t_top, topk_mode="renorm")
    r_near, _, _ = reverse_kl_per_token(s_near, ids, t_top, topk_mode="renorm")
    t_far, _, _ = reverse_kl_per_token(s_far, ids, t_top, topk_mode="tail")
    t_near, _, _ = reverse_kl_per_token(s_near, ids, t_top, topk_mode="tail")
    assert r_far.item() == pytest.approx(r_near.item(), abs=1e-6)
    assert t_near.item() == pytest.approx(0.0, abs=1e-6)
    # hand: 0.25 ln(0.25/0.5) + 0.15 ln(0.15/0.3) + 0.6 ln(0.6/0.2)
    assert t_far.item() == pytest.approx(0.4 * math.log(0.5) + 0.6 * math.log(3.0), rel=1e-5)


def test_padded_topk_slots_are_ignored():
    student, _, ids, t_top = _random_distill(40, K=3)
    pad_ids = torch.cat([ids, torch.full_like(ids[..., :2], -1)], -1)
    pad_lp = torch.cat([t_top, torch.full_like(t_top[..., :2], float("nan"))], -1)
    for mode in ("tail", "renorm"):
        ref, _, _ = reverse_kl_per_token(student, ids, t_top, topk_mode=mode)
        got, _, _ = reverse_kl_per_token(student, pad_ids, pad_lp, topk_mode=mode)
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_reverse_kl_gradient_only_to_student_and_not_at_masked(mode):
    student, _, ids, t_top = _random_distill(50, B=2, T=3)
    student = student.clone().requires_grad_(True)
    t_top = t_top.clone()
    t_top[1, 2] = float("nan")  # garbage at a masked position
    ids = ids.clone()
    ids[1, 2] = 10**6  # out-of-vocabulary garbage at a masked position
    t_top_req = t_top.clone().requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w = torch.tensor([[1.0, 0.0, 1.0], [2.0, 1.0, 5.0]])
    loss, m = reverse_kl_loss(student, ids, t_top_req, w, mask, topk_mode=mode)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert t_top_req.grad is None
    assert torch.all(student.grad[1, 2] == 0)  # masked
    assert torch.all(student.grad[0, 1] == 0)  # weight 0
    assert student.grad[0, 0].abs().sum() > 0
    assert m["distillation/nonfinite_frac"] == 0.0


def test_reverse_kl_loss_aggregation_and_weights_hand():
    student, _, ids, t_top = _random_distill(60, B=2, T=3)
    kl, _, _ = reverse_kl_per_token(student, ids, t_top)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    w = torch.tensor([[0.5, 2.0, 7.0], [3.0, 7.0, 7.0]])
    loss, m = reverse_kl_loss(student, ids, t_top, w, mask)
    expected = ((0.5 * kl[0, 0] + 2.0 * kl[0, 1]) / 2 + 3.0 * kl[1, 0]) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert m["distillation/reverse_kl"] == pytest.approx(((kl[0, 0] + kl[0, 1] + kl[1, 0]) / 3).item(), rel=1e-5)
    assert m["distillation/loss"] == pytest.approx(loss.item())


def test_reverse_kl_nan_teacher_at_valid_position_dropped_and_counted():
    student, _, ids, t_top = _random_distill(70, B=1, T=3)
    mask = torch.ones(1, 3)
    t_bad = t_top.clone()
    t_bad[0, 1, 0] = float("nan")
    loss, m = reverse_kl_loss(student, ids, t_bad, None, mask)
    kl, _, _ = reverse_kl_per_token(student, ids, t_top)
    assert loss.item() == pytest.approx(((kl[0, 0] + kl[0, 2]) / 3).item(), rel=1e-5)
    assert m["distillation/nonfinite_frac"] == pytest.approx(1 / 3)


def test_reverse_kl_all_masked_and_neg_inf_teacher():
    student, _, ids, t_top = _random_distill(80, B=2, T=2)
    student = student.clone().requires_grad_(True)
    loss, _ = reverse_kl_loss(student, ids, t_top, None, torch.zeros(2, 2))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))
    # a teacher log-prob of -inf (probability 0) stays finite: large but bounded penalty
    t_inf = t_top.clone()
    t_inf[..., -1] = float("-inf")
    student.grad = None
    loss, _ = reverse_kl_loss(student, ids, t_inf, None, torch.ones(2, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_reverse_kl_accepts_logits_or_logprobs_and_rejects_foreign_vocab():
    student, _, ids, t_top = _random_distill(90)
    a, _, _ = reverse_kl_per_token(student, ids, t_top)
    b, _, _ = reverse_kl_per_token(torch.log_softmax(student, -1), ids, t_top)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="vocabulary"):
        reverse_kl_per_token(student, ids + student.shape[-1], t_top)
    with pytest.raises(ValueError, match="topk_mode"):
        reverse_kl_per_token(student, ids, t_top, topk_mode="truncate")  # type: ignore[arg-type]


def test_gradient_descent_on_reverse_kl_approaches_teacher():
    student, teacher_full, ids, t_top = _random_distill(100, B=1, T=2, V=8, K=8)
    logits = student.clone().requires_grad_(True)
    mask = torch.ones(1, 2)
    first = None
    for _ in range(25):
        loss, _ = reverse_kl_loss(logits, ids, t_top, None, mask)
        first = loss.item() if first is None else first
        logits.grad = None
        loss.backward()
        with torch.no_grad():
            logits -= 1.0 * logits.grad
    assert loss.item() < 0.1 * first


# --------------------------------------------------------------------------------------------------
# entropy


def test_token_entropy():
    V = 5
    logits = torch.zeros(2, 2, V)
    logits[1, 0] = torch.tensor([100.0, 0, 0, 0, 0])  # near one-hot: entropy ~0
    logits[1, 1] = float("nan")  # masked garbage
    mask = torch.tensor([[1, 1], [1, 0]])
    ent = token_entropy(logits, mask)
    assert ent.item() == pytest.approx(2 * math.log(V) / 3, rel=1e-5)
    assert torch.isfinite(ent)
    # log-probs in, same answer; -inf entries (masked vocabulary) are fine
    lp = torch.log_softmax(torch.tensor([[[0.0, 0.0, float("-inf")]]]), -1)
    assert token_entropy(lp, torch.ones(1, 1)).item() == pytest.approx(math.log(2), rel=1e-6)
    assert token_entropy(logits, torch.zeros(2, 2)).item() == 0.0

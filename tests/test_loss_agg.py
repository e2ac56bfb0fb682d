"""`algorithm.loss_agg_mode` (mopd/losses.py `agg_loss`): hand-computed values, properties, agreement with
verl's `agg_loss`, exactness under micro-batching, and the trainer's gradient for every mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_trainer import cfg_for, make_samples
from tiny_models import save_tiny_models

from mopd.batch import build_batch
from mopd.config import ConfigError, LossAggMode, load_config
from mopd.losses import (
    AGG_MODES,
    agg_loss,
    agg_norm,
    pg_loss,
    reverse_kl_loss,
    reverse_kl_per_token,
    seq_mean_token_mean,
)

SMTM, TM, DB = "seq-mean-token-mean", "token-mean", "domain-balanced"


def _verl_core_algos():
    return pytest.importorskip("verl.trainer.ppo.core_algos",
                               reason="verl (test oracle) not importable in this venv")


def _random(B=9, T=7, seed=0, dtype=torch.float64, n_groups=3):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(B, T, generator=g, dtype=dtype)
    mask = (torch.rand(B, T, generator=g) > 0.4).float()
    mask[:, 0] = 1  # every row has a valid token ...
    mask[1] = 0  # ... but one
    group = torch.randint(0, n_groups, (B,), generator=g)
    group[[0, *range(2, n_groups + 1)]] = torch.arange(n_groups)  # every group present (row 1 is empty)
    return loss, mask, group


# --------------------------------------------------------------------------------------------------
# hand-computed values

# rows: a(1, 3) | a(4) | b(10, 20, 30, 40) | b(all masked) ; 100 = masked garbage
LOSS = torch.tensor([[1.0, 3.0, 100.0, 100.0], [4.0, 100.0, 100.0, 100.0], [10.0, 20.0, 30.0, 40.0],
                     [100.0, 100.0, 100.0, 100.0]])
MASK = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
GROUP = torch.tensor([0, 0, 1, 1])


def test_hand_values():
    # seq means 2, 4, 25; the empty row is left out: (2 + 4 + 25) / 3
    assert agg_loss(LOSS, MASK, SMTM).item() == pytest.approx(31 / 3)
    # all valid tokens: (1 + 3 + 4 + 10 + 20 + 30 + 40) / 7
    assert agg_loss(LOSS, MASK, TM).item() == pytest.approx(108 / 7)
    # domain a: (2 + 4) / 2 = 3; domain b: 25 (its empty row is not a sequence); (3 + 25) / 2
    assert agg_loss(LOSS, MASK, DB, GROUP).item() == pytest.approx(14.0)
    # The default is today's mode.
    assert agg_loss(LOSS, MASK).item() == pytest.approx(31 / 3)


def test_domain_balanced_ignores_absent_and_empty_domains():
    # Group id 5 is a domain whose only row has no valid token: not "present", so it is not averaged in.
    group = torch.tensor([0, 0, 1, 5])
    assert agg_loss(LOSS, MASK, DB, group).item() == pytest.approx(14.0)
    # One domain only: domain-balanced is seq-mean-token-mean.
    loss, mask, _ = _random()
    one = torch.zeros(loss.shape[0], dtype=torch.long)
    torch.testing.assert_close(agg_loss(loss, mask, DB, one), agg_loss(loss, mask, SMTM), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# agreement with verl


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_mean_agrees_with_verl(seed):
    core_algos = _verl_core_algos()
    loss, mask, _ = _random(seed=seed)
    ref = core_algos.agg_loss(loss, mask, "token-mean")
    torch.testing.assert_close(agg_loss(loss, mask, TM), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seq_mean_token_mean_agrees_with_verl(seed):
    """verl divides each sequence's sum by ``|y| + 1e-8``: a relative difference of ~1e-8 / |y|, so this
    mode agrees to ~1e-9, not 1e-10 (the tolerance below allows exactly that term, nothing more)."""
    core_algos = _verl_core_algos()
    loss, mask, _ = _random(seed=seed)
    ref = core_algos.agg_loss(loss, mask, "seq-mean-token-mean")
    torch.testing.assert_close(agg_loss(loss, mask, SMTM), ref, rtol=2e-8, atol=1e-10)
    # With verl's 1e-8 put into our per-sequence counts, the two agree to 1e-10.
    n_B = mask.sum(-1, keepdim=True)
    scaled = loss * torch.where(n_B > 0, n_B / (n_B + 1e-8), torch.ones_like(n_B))
    torch.testing.assert_close(agg_loss(scaled, mask, SMTM), ref, rtol=0, atol=1e-10)


def test_micro_batch_normalisers_agree_with_verl_global_ones():
    """A micro-batch's value with the whole batch's norm, times b / B, is verl's micro-batch loss given the
    global token count (token-mean) or the global sequence count (seq-mean-token-mean)."""
    core_algos = _verl_core_algos()
    loss, mask, _ = _random(B=10)
    norm = agg_norm(mask)
    idx = [0, 1, 2, 7]  # contains the all-masked row 1
    frac = len(idx) / 10
    ref_tm = core_algos.agg_loss(loss[idx], mask[idx], "token-mean", batch_num_tokens=norm.num_tokens)
    ours_tm = agg_loss(loss[idx], mask[idx], TM, norm=norm) * frac
    torch.testing.assert_close(ours_tm, ref_tm, rtol=0, atol=1e-10)
    ref_sm = core_algos.agg_loss(loss[idx], mask[idx], "seq-mean-token-mean", global_batch_size=norm.num_seqs)
    ours_sm = agg_loss(loss[idx], mask[idx], SMTM, norm=norm) * frac
    torch.testing.assert_close(ours_sm, ref_sm, rtol=2e-8, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seq_mean_token_mean_unchanged(seed):
    """The default mode is bit for bit today's `seq_mean_token_mean`, in value and gradient."""
    loss, mask, _ = _random(seed=seed, dtype=torch.float32)
    a, b = loss.clone().requires_grad_(), loss.clone().requires_grad_()
    new, old = agg_loss(a, mask), seq_mean_token_mean(b, mask)
    assert torch.equal(new, old)
    new.backward()
    old.backward()
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_mean_is_the_plain_mean_of_valid_tokens(seed):
    loss, mask, _ = _random(seed=seed)
    torch.testing.assert_close(agg_loss(loss, mask, TM), loss[mask.bool()].mean(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_domain_balanced_invariant_to_duplicating_a_domain(seed):
    """Copying every sample of one domain (twice more) changes neither the loss nor, per original sample,
    its gradient (the total gradient of a sample and its copies): the domain still weighs 1 / domains."""
    loss, mask, group = _random(seed=seed)
    rows = (group == 1).nonzero().flatten()
    base = agg_loss(loss, mask, DB, group)
    big_loss = torch.cat([loss, loss[rows], loss[rows]])
    big_mask = torch.cat([mask, mask[rows], mask[rows]])
    big_group = torch.cat([group, group[rows], group[rows]])
    torch.testing.assert_close(agg_loss(big_loss, big_mask, DB, big_group), base, rtol=0, atol=1e-12)
    # Under seq-mean-token-mean the same duplication does move the loss: the property is the mode's own.
    assert not torch.allclose(agg_loss(big_loss, big_mask, SMTM), agg_loss(loss, mask, SMTM))
    # Gradients: a sample's share is split evenly over its copies.
    x = big_loss.clone().requires_grad_()
    agg_loss(x, big_mask, DB, big_group).backward()
    y = loss.clone().requires_grad_()
    agg_loss(y, mask, DB, group).backward()
    n = loss.shape[0]
    total = x.grad[:n].clone()
    total[rows] += x.grad[n:n + len(rows)] + x.grad[n + len(rows):]
    torch.testing.assert_close(total, y.grad, rtol=0, atol=1e-12)


def test_domain_balanced_weighs_domains_not_samples():
    """Domain a: 1 short sample, domain b: 5 long ones. Under domain-balanced each domain's samples share
    half the gradient mass; under seq-mean-token-mean domain a gets 1/6, under token-mean 2/32."""
    loss = torch.ones(6, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(6, 6)
    mask[0, 2:] = 0  # a's sample: 2 tokens
    group = torch.tensor([0, 1, 1, 1, 1, 1])
    for mode, share_a in ((DB, 1 / 2), (SMTM, 1 / 6), (TM, 2 / 32)):
        loss.grad = None
        agg_loss(loss, mask, mode, group).backward()
        assert loss.grad[0].sum().item() == pytest.approx(share_a)
        assert loss.grad.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_all_masked_gives_zero_with_zero_gradient(mode):
    loss = torch.full((3, 4), float("nan"), requires_grad=True)  # garbage everywhere, nothing valid
    out = agg_loss(loss, torch.zeros(3, 4), mode, torch.tensor([0, 1, 1]))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss.grad, torch.zeros(3, 4))
    # And with a whole-batch norm that has nothing valid either (a micro-batch of an empty batch).
    loss.grad = None
    out = agg_loss(loss, torch.zeros(3, 4), mode, torch.tensor([0, 1, 1]),
                   norm=agg_norm(torch.zeros(6, 4), torch.tensor([0, 1, 1, 0, 1, 1])))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_masked_garbage_never_reaches_value_or_gradient(mode):
    loss, mask, group = _random()
    dirty = torch.where(mask.bool(), loss, torch.full_like(loss, float("nan"))).requires_grad_()
    out = agg_loss(dirty, mask, mode, group)
    torch.testing.assert_close(out, agg_loss(loss, mask, mode, group), rtol=0, atol=0)
    out.backward()
    assert torch.isfinite(dirty.grad).all() and (dirty.grad[~mask.bool()] == 0).all()


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("split", [[[0, 1, 2], [3, 4, 5], [6, 7, 8]], [[0], [1, 2, 3, 4, 5, 6, 7], [8]],
                                   [[4, 1], [8, 0, 3], [2, 5, 6, 7]]])
def test_micro_batches_sum_to_the_whole_batch(mode, split):
    """With the whole batch's norm, the row-weighted micro-batch losses (what the trainer accumulates) equal
    the whole-batch loss, value and gradient, for any split; without it they do not (uneven lengths,
    domains and an empty row make every mode differ)."""
    loss, mask, group = _random(B=9)
    norm = agg_norm(mask, group)
    x = loss.clone().requires_grad_()
    whole = agg_loss(x, mask, mode, group)
    (g_whole,) = torch.autograd.grad(whole, x)
    acc, naive = torch.zeros((), dtype=loss.dtype), torch.zeros((), dtype=loss.dtype)
    for idx in split:
        frac = len(idx) / 9
        acc = acc + agg_loss(x[idx], mask[idx], mode, group[idx], norm=norm) * frac
        naive = naive + agg_loss(loss[idx], mask[idx], mode, group[idx]) * frac
    (g_acc,) = torch.autograd.grad(acc, x)
    torch.testing.assert_close(acc, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_acc, g_whole, rtol=0, atol=1e-12)
    assert abs(naive.item() - whole.item()) > 1e-6


def test_pg_and_reverse_kl_thread_the_mode():
    g = torch.Generator().manual_seed(3)
    B, T, V = 5, 4, 11
    logp = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    w = torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[0, 2:] = 0
    mask[3, 1:] = 0
    group = torch.tensor([0, 1, 1, 1, 0])
    logits = torch.randn(B, T, V, generator=g)
    t_top = torch.randn(B, T, V, generator=g).log_softmax(-1).topk(4, -1)
    kl_BT, _, _ = reverse_kl_per_token(logits, t_top.indices, t_top.values)
    for mode in AGG_MODES:
        pg, m = pg_loss(logp, adv, w, mask, agg_mode=mode, group_B=group)
        torch.testing.assert_close(pg, agg_loss(-w * adv * logp, mask, mode, group), rtol=0, atol=1e-12)
        assert m["actor/pg_loss"] == pytest.approx(pg.item())
        kl, _ = reverse_kl_loss(logits, t_top.indices, t_top.values, None, mask, agg_mode=mode,
                                group_B=group)
        torch.testing.assert_close(kl, agg_loss(kl_BT, mask, mode, group), rtol=0, atol=1e-6)
    # The default of both is today's aggregation.
    assert torch.equal(pg_loss(logp, adv, w, mask)[0], pg_loss(logp, adv, w, mask, agg_mode=SMTM)[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'seq-mean'"):
        agg_loss(LOSS, MASK, "seq-mean")
    with pytest.raises(ValueError, match="needs group_B"):
        agg_loss(LOSS, MASK, DB)
    with pytest.raises(ValueError, match="one per row"):
        agg_loss(LOSS, MASK, DB, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integers"):
        agg_loss(LOSS, MASK, DB, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="computed with group ids"):
        agg_loss(LOSS, MASK, DB, GROUP, norm=agg_norm(MASK))
    with pytest.raises(ValueError, match="not in the norm"):
        agg_loss(LOSS, MASK, DB, torch.tensor([0, 0, 1, 2]), norm=agg_norm(MASK, GROUP))


def test_config_choice():
    assert {m.value for m in LossAggMode} == set(AGG_MODES)
    cfg = load_config("configs/quickstart.yaml", ["algorithm.loss_agg_mode=domain-balanced"])
    assert cfg.algorithm.loss_agg_mode == "domain-balanced"
    assert load_config("configs/quickstart.yaml", []).algorithm.loss_agg_mode == SMTM
    with pytest.raises(ConfigError, match="loss_agg_mode"):
        load_config("configs/quickstart.yaml", ["algorithm.loss_agg_mode=token-sum"])


# --------------------------------------------------------------------------------------------------
# the trainer: micro-batching is exact in every mode


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return save_tiny_models(d), d


def _grads_after_one_step(cfg, batch):
    """The accumulated gradient of the trainer's first step, read by post-accumulate hooks (before the
    clip and the optimizer), one tensor per parameter."""
    from mopd.trainer import Trainer

    tr = Trainer(cfg, cfg.student.path)
    grads: dict[str, torch.Tensor] = {}
    for name, p in tr.unwrapped.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: grads.__setitem__(name, p.grad.detach().clone()))
    m = tr.step(batch)
    return grads, m


@pytest.mark.parametrize("mode", AGG_MODES)
def test_trainer_micro_batch_gradient_equals_whole_batch(models, mode):
    tok, d = models
    samples = make_samples(tok, d / "teacher", n=8, top_k=8)
    batch = build_batch(samples, tok.pad_token_id)
    # Uneven lengths (one response entirely masked) and uneven domains: every mode's normalisers matter.
    mask = batch.mask_BT.clone()
    keep = [6, 1, 3, 0, 6, 2, 5, 4]
    for i, k in enumerate(keep):
        valid = mask[i].nonzero().flatten()
        mask[i, valid[k:]] = 0
    batch = dataclasses.replace(batch, mask_BT=mask, domains=["a", "a", "a", "a", "a", "b", "b", "c"])
    over = ("algorithm.objective=mixed", "algorithm.teacher_top_k=8", f"algorithm.loss_agg_mode={mode}",
            "trainer.grad_clip=1e9")
    g_micro, m_micro = _grads_after_one_step(cfg_for(d, *over, "trainer.micro_batch_size=3"), batch)
    g_whole, m_whole = _grads_after_one_step(cfg_for(d, *over, "trainer.micro_batch_size=64"), batch)
    assert g_micro.keys() == g_whole.keys() and g_whole
    assert max(g.abs().max().item() for g in g_whole.values()) > 1e-4  # a real gradient, not zeros
    for k in g_whole:
        torch.testing.assert_close(g_micro[k], g_whole[k], rtol=1e-6, atol=1e-6, msg=k)
    for k in ("actor/loss", "actor/pg_loss", "distillation/loss"):
        assert m_micro[k] == pytest.approx(m_whole[k], rel=1e-5, abs=1e-7)

"""Data-parallel trainer workers and token-budget micro-batches give the update of one worker on the whole
batch: real Ray actors in a placement group forming a real gloo `torch.distributed` group."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_loss_agg import _grads_after_one_step
from test_trainer import cfg_for, make_samples
from tiny_models import save_tiny_models
from transformers import AutoModelForCausalLM

from mopd.batch import build_batch, split_rows
from mopd.producer import mask_student_positions
from mopd.timing import timed


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return save_tiny_models(d), d


def uneven_batch(tok, d, n=8, top_k=8):
    """Rows of different lengths (responses cut to 6, 1, 3, 2, ... tokens) and three domains; the 6-token ones
    are multi-turn trajectories whose tokens 3-4 are an environment's observation (context only)."""
    out = []
    for i, s in enumerate(make_samples(tok, d / "teacher", n=n, top_k=top_k)):
        k = [6, 1, 3, 2, 6, 2, 5, 4][i % 8]
        mask = [1, 1, 0, 0, 1, 1] if k == 6 else None
        smp = dataclasses.replace(s.sample, response_ids=s.sample.response_ids[:k],
                                  rollout_logprobs=s.sample.rollout_logprobs[:k], student_mask=mask)
        scored = dataclasses.replace(s, sample=smp, teacher_logprobs=s.teacher_logprobs[:k],
                                     teacher_topk_ids=None if s.teacher_topk_ids is None else s.teacher_topk_ids[:k],
                                     teacher_topk_logprobs=None if s.teacher_topk_ids is None
                                     else s.teacher_topk_logprobs[:k],
                                     row={**s.row, "domain": "abc"[i % 3]})
        mask_student_positions(scored)
        out.append(scored)
    return build_batch(out, tok.pad_token_id)


def with_routing_records(batch, d):
    """Engine routing records (R3) for every real position: random distinct experts per layer."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(d / "student")
    B, L = batch.input_ids_BL.shape
    g = torch.Generator().manual_seed(0)
    experts = torch.rand(B, L, c.num_hidden_layers, c.num_experts, generator=g).argsort(-1)[..., :c.num_experts_per_tok]
    experts[~batch.attention_mask_BL.bool()] = -1
    return dataclasses.replace(batch, routed_experts_BLNK=experts)


# -- splitting rows -------------------------------------------------------------------------------------
def test_split_rows_covers_every_row_once_and_balances_tokens():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        B = int(torch.randint(1, 40, (1,), generator=g))
        lengths = torch.randint(3, 60, (B,), generator=g).tolist()
        workers = int(torch.randint(1, 5, (1,), generator=g))
        budget = int(torch.randint(0, 200, (1,), generator=g))
        plan = split_rows(lengths, workers, 3, budget)
        assert len(plan) == workers
        rows = sorted(i for w in plan for mb in w for i in mb)
        assert rows == list(range(B))
        if B >= workers:
            assert all(plan), "every worker gets rows when there are enough"
        load = [sum(lengths[i] for mb in w for i in mb) for w in plan]
        assert max(load) - min(load) <= max(lengths)  # greedy by tokens: within one row of even
        for w in plan:
            for mb in w:
                if budget:
                    assert len(mb) == 1 or len(mb) * max(lengths[i] for i in mb) <= budget
                else:
                    assert len(mb) <= 3


def test_one_worker_without_a_budget_keeps_the_consecutive_micro_batches():
    assert split_rows([5, 9, 2, 7, 1], 1, 2) == [[[0, 1], [2, 3], [4]]]


def test_token_budget_groups_similar_lengths():
    plan = split_rows([10, 2, 10, 2, 2, 10], 1, 64, max_tokens=20)
    assert plan == [[[0, 2], [1, 5], [3, 4]]]  # each within 20 padded tokens: 2 x 10, 2 x 10, 2 x 2


# -- the trainer ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [12, 30])
def test_token_budget_accumulation_equals_the_whole_batch_update(models, budget):
    tok, d = models
    batch = uneven_batch(tok, d)
    over = ("algorithm.objective=mixed", "algorithm.teacher_top_k=8", "algorithm.loss_agg_mode=domain-balanced",
            "trainer.grad_clip=1e9")
    assert len(split_rows(batch.lengths(), 1, 64, budget)[0]) > 2  # really several micro-batches
    g_tok, m_tok = _grads_after_one_step(cfg_for(d, *over, f"trainer.max_tokens_per_micro_batch={budget}"), batch)
    g_whole, m_whole = _grads_after_one_step(cfg_for(d, *over, "trainer.micro_batch_size=64"), batch)
    assert g_tok.keys() == g_whole.keys() and g_whole
    assert max(g.abs().max().item() for g in g_whole.values()) > 1e-4
    for k in g_whole:
        torch.testing.assert_close(g_tok[k], g_whole[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in ("actor/loss", "actor/pg_loss", "distillation/loss", "actor/entropy"):
        assert m_tok[k] == pytest.approx(m_whole[k], rel=1e-5, abs=1e-7)


# -- workers as Ray actors ---------------------------------------------------------------------------------
def _placement(n):
    from ray.util import placement_group

    from mopd.placement import BundlePlan, Placement

    plan = BundlePlan()
    plan.add("trainer", n, 1, 0, "trainer.num_workers x trainer.num_cpus")
    pg = placement_group(plan.bundles)
    assert pg.wait(timeout_seconds=60)
    return Placement(pg, plan, 0.0)


def _run(cfg, model_path, batch, steps, ck=None):
    """`steps` steps with cfg.trainer.num_workers actors (resumed from `ck` if given): every worker's weights
    after them, the step records, and the trainer (the caller closes it)."""
    from mopd.trainer_actor import RemoteTrainer

    placement = _placement(cfg.trainer.num_workers)
    tr = RemoteTrainer(cfg, model_path, placement)
    tr.close = lambda: (RemoteTrainer.close(tr), placement.remove())  # frees the bundles for the next run
    if ck is not None:
        tr.load(ck)
    metrics = [tr.step(batch) for _ in range(steps)]
    return tr.weights(), metrics, tr


def _save_then_step(tr, run_dir, step, batch):
    """Checkpoint `tr` at `step`, then take one more step: the checkpoint and rank 0's weights after it."""
    from mopd.checkpoint import latest_checkpoint

    tr.save(run_dir, step, {})
    ck = latest_checkpoint(run_dir)
    assert ck is not None and ck.name == f"step_{step}"
    tr.step(batch)
    return ck, tr.weights()[0]


# Tolerances of data-parallel vs single-worker weights. The two runs add the same per-row gradients in a
# different order (each worker's share, then gloo's sum of the shares): about 1e-7 relative per gradient
# element in fp32. Adam then divides every element by its own running scale, so an element whose gradient is
# itself at round-off level (cancellation: ~0.1% of the tiny MoE's expert weights here) moves by up to lr per
# step with an arbitrary sign in either run, while every other element agrees to ~1e-7. Measured here after
# 3 steps at lr 1e-2: the update differs by 8.7e-5 of its norm, 0.06% of the elements by more than 1e-5. A
# row lost or counted twice (1 of 8) changes the update by ~10% of its norm and most elements.
REL_TOL = 1e-3  # || update_2 - update_1 || / || update_1 ||
FRAC_TOL = 5e-3  # share of elements that differ by more than ELEM_TOL
ELEM_TOL = 1e-5


def _rel_update_diff(wa, wb, w0):
    num = sum(((wa[k] - wb[k]) ** 2).sum().item() for k in wb) ** 0.5
    den = sum(((wb[k] - w0[k]) ** 2).sum().item() for k in wb) ** 0.5
    assert den > 0.1  # the weights really moved
    return num / den


def _frac_differing(wa, wb):
    return sum(((wa[k] - wb[k]).abs() > ELEM_TOL).sum().item() for k in wb) / sum(wb[k].numel() for k in wb)


def test_two_workers_on_half_batches_equal_one_worker_on_the_whole_batch(models, ray_local, tmp_path):
    """Tolerances: see REL_TOL. R3 on: each worker replays the engine's recorded experts on its rows, and the
    r3/* figures are counted over the whole batch. Also: checkpoints written by 2 workers resume in 1 and
    the reverse."""
    tok, d = models
    batch = with_routing_records(uneven_batch(tok, d), d)
    over = ("algorithm.objective=mixed", "algorithm.teacher_top_k=8", "trainer.grad_clip=1e9", "algorithm.r3=true")
    w0 = AutoModelForCausalLM.from_pretrained(d / "student").state_dict()
    (w1,), m1, t1 = _run(cfg_for(d, *over, "trainer.num_workers=1", "trainer.micro_batch_size=64"),
                         cfg_for(d).student.path, batch, 3)
    t1.close()
    cfg2 = cfg_for(d, *over, "trainer.num_workers=2", "trainer.micro_batch_size=2")
    assert all(len(w) == 2 for w in split_rows(batch.lengths(), 2, 2))  # each worker accumulates 2 micro-batches
    (wa, wb), m2, t2 = _run(cfg2, cfg2.student.path, batch, 3)
    try:
        assert all(torch.equal(wa[k], wb[k]) for k in wa), "data-parallel replicas diverged"
        assert _rel_update_diff(wa, w1, w0) <= REL_TOL
        assert _frac_differing(wa, w1) <= FRAC_TOL
        # The step record is the whole batch's on both (losses summed across workers).
        for a, b in zip(m1, m2, strict=True):
            for k in ("actor/loss", "distillation/loss", "actor/entropy", "mopd/teacher_kl"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
            assert b["r3/replayed_frac"] == 1.0
            for k in ("r3/router_agreement", "r3/own_router_agreement", "r3/token_any_mismatch"):
                assert a[k] == pytest.approx(b[k], abs=1e-9), k

        # Checkpoint written by 2 workers, resumed by 1 (and the reverse): the next step agrees.
        ck2, w2next = _save_then_step(t2, tmp_path / "two", 3, batch)
    finally:
        t2.close()
    cfg1 = cfg_for(d, *over, "trainer.num_workers=1", "trainer.micro_batch_size=64")
    (w1r,), _, t1r = _run(cfg1, str(ck2 / "model"), batch, 1, ck=ck2)
    try:
        assert _rel_update_diff(w1r, w2next, wa) <= REL_TOL and _frac_differing(w1r, w2next) <= FRAC_TOL
        ck1, w1next = _save_then_step(t1r, tmp_path / "one", 4, batch)
    finally:
        t1r.close()
    (w2r, _), _, t2r = _run(cfg2, str(ck1 / "model"), batch, 1, ck=ck1)
    t2r.close()
    assert _rel_update_diff(w2r, w1next, w1r) <= REL_TOL and _frac_differing(w2r, w1next) <= FRAC_TOL


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_workers_equal_one_worker_and_resume_with_another_count(models, ray_local, tmp_path, stage):
    """ZeRO-2/3 across 2 workers (gradients and optimizer state partitioned, weights too under ZeRO-3):
    the same update as one worker, and its checkpoint (whole Adam moments) resumes in one worker."""
    tok, d = models
    batch = uneven_batch(tok, d)
    w0 = AutoModelForCausalLM.from_pretrained(d / "student").state_dict()
    over = ("algorithm.objective=mixed", "algorithm.teacher_top_k=8", "trainer.grad_clip=1e9",
            "trainer.backend=deepspeed", f"trainer.zero_stage={stage}")
    cfg1 = cfg_for(d, *over, "trainer.num_workers=1", "trainer.micro_batch_size=64")
    cfg2 = cfg_for(d, *over, "trainer.num_workers=2", "trainer.micro_batch_size=2")
    (w1,), _, t1 = _run(cfg1, cfg1.student.path, batch, 2)
    t1.close()
    (wa, wb), _, t2 = _run(cfg2, cfg2.student.path, batch, 2)
    try:
        if stage == 2:  # ZeRO-3 gathers the whole weights on rank 0 only
            assert all(torch.equal(wa[k], wb[k]) for k in wa), "data-parallel replicas diverged"
        assert _rel_update_diff(wa, w1, w0) <= REL_TOL and _frac_differing(wa, w1) <= FRAC_TOL
        ck, w2next = _save_then_step(t2, tmp_path, 2, batch)
    finally:
        t2.close()
    (w1r,), _, t1r = _run(cfg1, str(ck / "model"), batch, 1, ck=ck)
    t1r.close()
    assert _rel_update_diff(w1r, w2next, wa) <= REL_TOL and _frac_differing(w1r, w2next) <= FRAC_TOL


# -- chunked log-probs in the trainer ------------------------------------------------------------------------
@pytest.mark.parametrize("objective,top_k", [("mixed", 8), ("reverse_kl", -1), ("pg", 0)])
def test_chunked_logits_give_the_unchunked_step(models, objective, top_k):
    """`trainer.logits_chunk_tokens`: the same pi_old, losses, metrics and gradients (fp32, <= 1e-5) as the
    whole-vocabulary forward, with a token budget on too."""
    tok, d = models
    batch = uneven_batch(tok, d, top_k=64 if top_k == -1 else max(top_k, 1))
    if top_k == 0:
        batch = dataclasses.replace(batch, teacher_topk_ids_BTK=None, teacher_topk_logprobs_BTK=None)
    over = (f"algorithm.objective={objective}", f"algorithm.teacher_top_k={top_k}", "trainer.grad_clip=1e9",
            "algorithm.ppo_epochs=2")  # the second epoch's PPO ratio uses the chunked pi_old
    g_c, m_c = _grads_after_one_step(cfg_for(d, *over, "trainer.logits_chunk_tokens=3",
                                             "trainer.max_tokens_per_micro_batch=30"), batch)
    g_w, m_w = _grads_after_one_step(cfg_for(d, *over, "trainer.micro_batch_size=64"), batch)
    assert g_c.keys() == g_w.keys() and max(g.abs().max().item() for g in g_w.values()) > 1e-4
    for k in g_w:
        torch.testing.assert_close(g_c[k], g_w[k], rtol=1e-5, atol=1e-5, msg=k)
    keys = [k for k in m_w if k.startswith(("actor/", "distillation/", "mopd/", "rollout_corr/")) and "grad_norm" not in k
            and not k.startswith("timing")]
    assert "actor/entropy" in keys and "actor/loss" in keys
    for k in keys:  # the second epoch's figures follow an Adam step, which amplifies round-off (see REL_TOL)
        assert m_c[k] == pytest.approx(m_w[k], rel=1e-4, abs=1e-5, nan_ok=True), k


@pytest.mark.parametrize("objective,extra", [("mixed", ("algorithm.alpha_orm=0.5", "rollout.n=2")), ("pg", ()),
                                             ("orm", ("rollout.n=2",)), ("sft", ())])
def test_pi_old_from_the_training_forward_gives_the_separate_pass_update(models, objective, extra):
    """One pass per batch: `step` takes pi_old from the training forward (no separate no-grad pass); the
    gradients, losses and every whole-batch metric equal those of a separate pi_old pass over the whole batch
    first (the trainer's path when a batch-wide statistic needs it), whose metrics come from the public
    `correction` and `advantages`."""
    from mopd.trainer import Trainer

    tok, d = models
    batch = uneven_batch(tok, d)
    cfg = cfg_for(d, f"algorithm.objective={objective}", "algorithm.teacher_top_k=8", "trainer.grad_clip=1e9",
                  "trainer.max_tokens_per_micro_batch=30", "algorithm.correction=icepop", *extra)
    out = {}
    for fused in (True, False):
        tr = Trainer(cfg, cfg.student.path)
        grads: dict[str, torch.Tensor] = {}
        for name, p in tr.unwrapped.named_parameters():
            p.register_post_accumulate_grad_hook(
                lambda p, name=name, grads=grads: grads.__setitem__(name, p.grad.detach().clone()))
        if fused:
            out[fused] = (tr.step(batch), grads)
            continue
        m: dict[str, float] = {}
        with timed("old_log_prob", m):
            old = tr.logprobs(batch)
        tr.correction(batch, old, m)
        tr.advantages(batch, old, m)
        with timed("train", m):
            tr.optimize(batch, tr.targets(batch, old), m)
        out[fused] = (m, grads)
    (m_f, g_f), (m_s, g_s) = out[True], out[False]
    assert m_f["timing_s/old_log_prob"] == 0.0 and m_s["timing_s/old_log_prob"] > 0
    for k in g_s:
        torch.testing.assert_close(g_f[k], g_s[k], rtol=1e-6, atol=1e-7, msg=k)
    keys = {k for k in m_s if not k.startswith("timing_s/")}
    assert keys == {k for k in m_f if not k.startswith("timing_s/")}
    for k in keys:
        assert m_f[k] == pytest.approx(m_s[k], rel=1e-6, abs=1e-9, nan_ok=True), k

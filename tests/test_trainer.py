"""The trainer takes real optimizer steps on a real transformers MoE model and moves it the right way."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_models

from mopd.batch import build_batch
from mopd.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mopd.config import load_config
from mopd.producer import ScoredSample
from mopd.trainer import NonFiniteError, Trainer
from rollout.types import Sample


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return save_tiny_models(d), d


def make_samples(tok, teacher, n=8, top_k=0):
    """Samples of the student's own policy scored by a transformers teacher (no engine needed here)."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(teacher.parent / "student")
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p = tok.encode(f"rev:abc{i}=", add_special_tokens=False)
        ids = torch.tensor([p])
        with torch.no_grad():
            for _ in range(6):
                probs = student(ids).logits[0, -1].softmax(-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)[None]], 1)
            s_lp = student(ids).logits[0, :-1].log_softmax(-1)
        seq = ids[0].tolist()
        r = seq[len(p):]
        mu = [s_lp[len(p) - 1 + j, t].item() for j, t in enumerate(r)]
        tm = AutoModelForCausalLM.from_pretrained(teacher) if i == 0 else tm  # noqa: F821
        with torch.no_grad():
            t_lp = tm(ids).logits[0, :-1].log_softmax(-1)
        tl = [t_lp[len(p) - 1 + j, t].item() for j, t in enumerate(r)]
        ss = ScoredSample(row={"id": str(i), "domain": "rev"}, group=i // 2,
                          sample=Sample(p, r, mu, "length"), teacher="t", teacher_logprobs=tl)
        if top_k:
            top = t_lp[len(p) - 1:len(p) - 1 + len(r)].topk(top_k, -1)
            ss.teacher_topk_ids = top.indices.numpy()
            ss.teacher_topk_logprobs = top.values.numpy()
        out.append(ss)
    return out


def weights(tr):
    """A copy of the trainer's weights (`state_dict` may share storage with the live parameters)."""
    return {k: v.clone() for k, v in tr.state_dict().items()}


def cfg_for(d, *over):
    return load_config("configs/quickstart.yaml", [f"student.path={d}/student", "trainer.lr=1e-2",
                                                    "trainer.micro_batch_size=3", "trainer.warmup_steps=0",
                                                    "algorithm.objective=pg", "algorithm.teacher_top_k=0", *over])


def test_reverse_kl_steps_move_student_toward_teacher(models):
    tok, d = models
    cfg = cfg_for(d, "algorithm.objective=reverse_kl", "algorithm.teacher_top_k=-1", "trainer.lr=1e-3")
    batch = build_batch(make_samples(tok, d / "teacher", top_k=64), tok.pad_token_id)
    tr = Trainer(cfg, cfg.student.path)
    first = tr.step(batch)
    for _ in range(8):
        last = tr.step(batch)
    # The exact reverse KL is what the step minimises. (The sampled-token estimate mopd/teacher_kl on these
    # fixed samples is no such guarantee: with two near-uniform fresh models it starts at ~0 and may rise.)
    assert last["distillation/loss"] < 0.7 * first["distillation/loss"]
    assert first["actor/grad_norm"] > 0
    # Micro-batching is an implementation detail: the first-step loss is the same with one micro-batch.
    tr1 = Trainer(cfg_for(d, "algorithm.objective=reverse_kl", "algorithm.teacher_top_k=-1", "trainer.lr=1e-3",
                          "trainer.micro_batch_size=64"), cfg.student.path)
    assert tr1.step(batch)["distillation/loss"] == pytest.approx(first["distillation/loss"], rel=1e-5)


def test_pg_step_raises_teacher_preferred_tokens(models):
    tok, d = models
    cfg = cfg_for(d, "algorithm.objective=pg", "trainer.lr=3e-3")
    batch = build_batch(make_samples(tok, d / "teacher"), tok.pad_token_id)
    tr = Trainer(cfg, cfg.student.path)
    m0 = tr.step(batch)
    for _ in range(5):
        m = tr.step(batch)
    # The policy gradient of Eq. 7 on fixed samples lowers mean(log pi_theta - log pi_teacher).
    assert m["mopd/teacher_kl"] < m0["mopd/teacher_kl"]
    # On-policy fresh model: pi_old equals mu, so IcePop keeps every token.
    assert m0["icepop/masked_frac"] == 0.0
    assert m0["rollout_corr/k3_kl"] == pytest.approx(0.0, abs=1e-5)


def test_nan_teacher_logprobs_do_not_reach_weights(models):
    """A teacher that returns NaN gives those tokens no signal (advantage 0): a finite step, finite weights."""
    tok, d = models
    samples = make_samples(tok, d / "teacher", n=4)
    for s in samples:
        s.teacher_logprobs = [float("nan")] * len(s.teacher_logprobs)
    tr = Trainer(cfg_for(d), str(d / "student"))
    m = tr.step(build_batch(samples, tok.pad_token_id))
    assert m["mopd/advantage/min"] == m["mopd/advantage/max"] == 0.0
    assert m["actor/pg_loss"] == 0.0 and "actor/skipped_step" not in m
    assert all(torch.isfinite(v).all() for v in tr.state_dict().values())


def test_non_finite_gradient_skips_the_step_and_three_in_a_row_raise(models):
    """With the advantage clamp off, a teacher log-prob of -1e30 on one token (finite, but absurd) gives a
    finite loss (~1e29) whose gradient norm overflows: the guard must skip the update, not apply it."""
    tok, d = models
    good = make_samples(tok, d / "teacher", n=4)
    bad = [copy.deepcopy(s) for s in good]
    bad[0].teacher_logprobs[2] = -1e30
    good_b, bad_b = build_batch(good, tok.pad_token_id), build_batch(bad, tok.pad_token_id)
    tr = Trainer(cfg_for(d, "algorithm.advantage_clip=null"), str(d / "student"))

    def skipped_unchanged() -> dict[str, float]:
        before = weights(tr)
        m = tr.step(bad_b)
        assert math.isfinite(m["actor/loss"]) and abs(m["actor/loss"]) > 1e20  # the loss itself passes the check
        assert not math.isfinite(m["actor/grad_norm"]) and m["actor/skipped_step"] == 1.0
        after = tr.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # no update at all
        return m

    skipped_unchanged()
    skipped_unchanged()
    # A good step in between updates the weights, with nothing left over from the skipped ones: its loss and
    # gradient are a fresh trainer's on the same weights.
    before = weights(tr)
    m = tr.step(good_b)
    fresh = Trainer(cfg_for(d, "algorithm.advantage_clip=null"), str(d / "student")).step(good_b)
    assert "actor/skipped_step" not in m
    assert m["actor/grad_norm"] == pytest.approx(fresh["actor/grad_norm"], rel=1e-5)
    assert m["actor/loss"] == pytest.approx(fresh["actor/loss"], rel=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in tr.state_dict().items())
    # It also reset the count: two more bad steps are only skipped ...
    skipped_unchanged()
    skipped_unchanged()
    # ... and the third in a row raises, still without touching the weights.
    before = weights(tr)
    with pytest.raises(NonFiniteError, match="non-finite gradient norm"):
        tr.step(bad_b)
    assert all(torch.equal(before[k], v) for k, v in tr.state_dict().items())


def test_checkpoint_roundtrip(models, tmp_path):
    tok, d = models
    cfg = cfg_for(d)
    batch = build_batch(make_samples(tok, d / "teacher", n=4), tok.pad_token_id)
    tr = Trainer(cfg, cfg.student.path)
    tr.step(batch)
    save_checkpoint(tmp_path, 1, tr, tok, {"note": "x"})
    ck = latest_checkpoint(tmp_path)
    assert ck is not None and ck.name == "step_1"
    tr2 = Trainer(cfg, str(ck / "model"))
    assert load_checkpoint(ck, tr2)["note"] == "x"
    for k, v in tr.state_dict().items():
        assert torch.equal(v, tr2.state_dict()[k])
    # Same state -> the next step is identical in both trainers.
    assert tr.step(batch)["actor/pg_loss"] == pytest.approx(tr2.step(batch)["actor/pg_loss"], rel=1e-6)
    assert not list(tmp_path.glob("checkpoints/.*"))  # no temporary leftovers
    # Every file of a real checkpoint is shareable (model.safetensors used to be 0600), every folder 0755.
    modes = {p.relative_to(ck): p.stat().st_mode & 0o777 for p in ck.rglob("*")}
    assert modes[Path("model/model.safetensors")] == 0o644
    assert {m for p, m in modes.items() if (ck / p).is_file()} == {0o644}
    assert {m for p, m in modes.items() if (ck / p).is_dir()} == {0o755}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_takes_a_real_step(models, stage):
    tok, d = models
    cfg = cfg_for(d, "trainer.backend=deepspeed", f"trainer.zero_stage={stage}", "trainer.micro_batch_size=64")
    batch = build_batch(make_samples(tok, d / "teacher", n=4), tok.pad_token_id)
    tr = Trainer(cfg, cfg.student.path)
    assert type(tr.model).__name__ == "DeepSpeedEngine"
    before = weights(tr)
    m = tr.step(batch)
    after = tr.state_dict()
    assert m["actor/grad_norm"] > 0
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, changed
    # Leave no ZeRO-3 state behind for models loaded later in this process.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def test_sft_objective_fits_the_given_samples(models):
    tok, d = models
    cfg = cfg_for(d, "algorithm.objective=sft", "trainer.lr=1e-2")
    batch = build_batch(make_samples(tok, d / "teacher", n=4), tok.pad_token_id)
    tr = Trainer(cfg, cfg.student.path)
    first = tr.step(batch)["actor/sft_loss"]
    for _ in range(5):
        last = tr.step(batch)["actor/sft_loss"]
    assert 0 < last < 0.8 * first


def test_orm_objective_follows_verifier_scores(models):
    tok, d = models
    cfg = cfg_for(d, "algorithm.objective=orm", "trainer.lr=3e-3", "rollout.n=2")
    samples = make_samples(tok, d / "teacher", n=8)
    for i, s in enumerate(samples):  # groups of two: the first of each pair is "correct"
        s.score = 1.0 if i % 2 == 0 else 0.0
    batch = build_batch(samples, tok.pad_token_id)
    tr = Trainer(cfg, cfg.student.path)
    good, bad = list(range(0, 8, 2)), list(range(1, 8, 2))
    lp0 = tr.logprobs(batch)
    for _ in range(4):
        m = tr.step(batch)
    lp1 = tr.logprobs(batch)
    gain = ((lp1 - lp0) * batch.mask_BT).sum(1) / batch.mask_BT.sum(1)
    assert gain[good].mean() > gain[bad].mean()
    assert m["mopd/advantage/max"] > 0 > m["mopd/advantage/min"]


def test_r3_replay_in_trainer(models):
    """Replaying the routing the model itself would choose changes nothing and agrees 100%;
    replaying other experts changes log-probs and is reported as disagreement."""
    from transformers import AutoModelForCausalLM

    from stability.r3 import RoutingReplay

    tok, d = models
    samples = make_samples(tok, d / "teacher", n=4)
    batch = build_batch(samples, tok.pad_token_id)
    hf = AutoModelForCausalLM.from_pretrained(d / "student")
    rr = RoutingReplay(hf)
    with torch.no_grad(), rr.capture() as cap:
        hf(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL)
    own = cap.experts_BLNK
    for b, s in enumerate(samples):
        s.sample.routed_experts = own[b, : len(s.sample.prompt_ids) + len(s.sample.response_ids)].numpy()
    replayed = build_batch(samples, tok.pad_token_id)
    assert replayed.routed_experts_BLNK is not None
    plain = Trainer(cfg_for(d), str(d / "student"))
    r3 = Trainer(cfg_for(d, "algorithm.r3=true"), str(d / "student"))
    assert torch.allclose(plain.logprobs(batch), r3.logprobs(replayed), atol=1e-6)
    m = r3.step(replayed)
    assert m["r3/router_agreement"] == 1.0 and m["r3/replayed_frac"] == 1.0
    assert m["r3/own_router_agreement"] == 1.0
    # Shift every recorded expert id: different routing, different log-probs, counted as mismatch.
    n_exp = hf.config.num_experts
    for s in samples:
        s.sample.routed_experts = (s.sample.routed_experts + 1) % n_exp
    other = build_batch(samples, tok.pad_token_id)
    r3b = Trainer(cfg_for(d, "algorithm.r3=true"), str(d / "student"))
    assert not torch.allclose(plain.logprobs(batch), r3b.logprobs(other), atol=1e-3)
    m = r3b.step(other)
    assert m["r3/own_router_agreement"] < 0.5  # the router itself prefers other experts ...
    assert m["r3/router_agreement"] == 1.0  # ... but the forward used exactly the recorded ones
    # R3 off but routing captured: nothing is replayed, so the used routing is the router's own.
    observe = Trainer(cfg_for(d, "algorithm.r3_capture=true"), str(d / "student"))
    assert torch.allclose(plain.logprobs(batch), observe.logprobs(other), atol=1e-6)
    mo = observe.step(other)
    assert mo["r3/router_agreement"] == mo["r3/own_router_agreement"] < 0.5


@pytest.mark.parametrize("backend", ["accelerate", "deepspeed"])
def test_frozen_parameters_stay_put_and_leave_the_sync(models, tmp_path, backend):
    """`trainer.freeze`: matching parameters never change, the optimizer holds no state for them, a sync can
    leave them out, and a checkpoint resumes only under the freeze that wrote it."""
    from mopd.config import ConfigError

    tok, d = models
    over = ['trainer.freeze=["*.mlp.gate.weight"]', f"trainer.backend={backend}", "trainer.micro_batch_size=64"]
    cfg = cfg_for(d, *over)
    batch = build_batch(make_samples(tok, d / "teacher", n=4), tok.pad_token_id)
    tr = Trainer(cfg, cfg.student.path)
    routers = {n for n, _ in tr.unwrapped.named_parameters() if n.endswith(".mlp.gate.weight")}
    assert tr.frozen == routers and routers
    before = weights(tr)
    assert tr.step(batch)["actor/grad_norm"] > 0
    after = weights(tr)
    assert all(torch.equal(before[k], after[k]) for k in routers)
    assert sum(not torch.equal(before[k], after[k]) for k in after) >= len(after) // 2
    assert set(tr.state_dict(trained_only=True)) == set(after) - routers
    save_checkpoint(tmp_path, 1, tr, tok, {})
    ck = latest_checkpoint(tmp_path)
    tr2 = Trainer(cfg, str(ck / "model"))
    load_checkpoint(ck, tr2)
    assert tr.step(batch)["actor/loss"] == pytest.approx(tr2.step(batch)["actor/loss"], rel=1e-6)
    if backend == "accelerate":  # DeepSpeed's state is by parameter name: an unfrozen one starts fresh
        with pytest.raises(ValueError, match="trainer.freeze"):
            load_checkpoint(ck, Trainer(cfg_for(d, *over[1:]), str(ck / "model")))
    with pytest.raises(ConfigError, match="matches no parameter.*mlp.gate.weight"):
        Trainer(cfg_for(d, 'trainer.freeze=["*.router.weight"]'), cfg.student.path)
    with pytest.raises(ConfigError, match="freezes every parameter"):
        Trainer(cfg_for(d, 'trainer.freeze=["*"]'), cfg.student.path)
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def test_centred_advantage_trains_on_a_zero_mean_advantage(models):
    """`algorithm.advantage_norm=center`: the batch's advantage has mean 0 over its tokens (pi_old comes from
    its own pass first, since the mean needs every row), and the step still moves the weights."""
    tok, d = models
    cfg = cfg_for(d, "algorithm.advantage_norm=center")
    batch = build_batch(make_samples(tok, d / "teacher", n=6), tok.pad_token_id)
    tr = Trainer(cfg, cfg.student.path)
    before = weights(tr)
    m = tr.step(batch)
    assert abs(m["mopd/advantage/mean"]) < 1e-5 and "mopd/teacher_kl" in m
    assert m["timing_s/old_log_prob"] > 0
    assert any(not torch.equal(before[k], v) for k, v in weights(tr).items())
    plain = Trainer(cfg_for(d), cfg.student.path).step(batch)
    assert abs(plain["mopd/advantage/mean"]) > 1e-4  # uncentred: the mean that centring removes

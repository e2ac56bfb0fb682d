"""The vLLM engines inside Ray actors, checked against transformers forwards of the same weights."""

from __future__ import annotations

import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd.data import encode_rows
from mopd.world.tasks import read_jsonl
from rollout.actors import start_student_engines
from rollout.types import EngineSpec
from teachers.vllm_teacher import start_teacher

pytestmark = pytest.mark.slow
MML = 64


def hf_logprobs(model, seqs, plens):
    out = []
    with torch.no_grad():
        for s, p in zip(seqs, plens, strict=True):
            lp = model(torch.tensor([s])).logits.float().log_softmax(-1)[0]
            out.append(torch.tensor([lp[t - 1, s[t]].item() for t in range(p, len(s))]))
    return out


def max_diff(a, b):
    return max((torch.tensor(x) - torch.as_tensor(y)).abs().max().item() for x, y in zip(a, b, strict=True) if len(x))


@pytest.fixture(scope="module")
def actors(tiny_world, ray_local):
    d = tiny_world["dir"]
    kw = dict(max_model_len=MML, dtype="float32", enforce_eager=True, num_cpus=0.5, num_gpus=0, omp_threads=1,
              kv_cache_gb=1, gpu_memory_utilization=0.3)
    student = start_student_engines(EngineSpec(f"{d}/student", seed=0, **kw), num_engines=1)[0]
    teacher = start_teacher(EngineSpec(f"{d}/teachers/rev", max_top_k=-1, **kw), replicas=1)[0]
    ray_local.get([student.ready.remote(), teacher.ready.remote()])
    yield student, teacher
    ray_local.kill(student)
    ray_local.kill(teacher)


@pytest.fixture(scope="module")
def prompts(tiny_world):
    tok = AutoTokenizer.from_pretrained(f"{tiny_world['dir']}/student")
    rows = read_jsonl(os.path.join(tiny_world["dir"], "data", "eval.jsonl"))
    rows = [r for d in ("add", "rev", "sort") for r in rows if r["domain"] == d][:: max(1, len(rows) // 12)][:12]
    return tok, rows, encode_rows(tok, rows, 32)


@pytest.fixture(scope="module")
def rollout_out(actors, prompts, ray_local):
    student, _ = actors
    return ray_local.get(student.generate.remote(prompts[2], n=3, temperature=1.0, max_tokens=12, seed=11))


def test_student_actor_generates_with_logprobs(actors, prompts, rollout_out, ray_local, tiny_world):
    student, _ = actors
    tok, rows, ids = prompts
    assert len(rollout_out) == len(ids) and all(len(g) == 3 for g in rollout_out)
    lens = set()
    for p, group in zip(ids, rollout_out, strict=True):
        for s in group:
            assert s.prompt_ids == p
            assert 1 <= len(s.response_ids) <= 12
            assert len(s.rollout_logprobs) == len(s.response_ids)
            assert all(math.isfinite(x) and x <= 0 for x in s.rollout_logprobs)
            assert s.finish_reason in ("stop", "length")
            lens.add(len(s.response_ids))
    # n > 1 gives distinct samples; the same seed gives the same samples.
    assert any(len({tuple(s.response_ids) for s in g}) > 1 for g in rollout_out)
    again = ray_local.get(student.generate.remote(ids, n=3, temperature=1.0, max_tokens=12, seed=11))
    assert [[s.response_ids for s in g] for g in again] == [[s.response_ids for s in g] for g in rollout_out]
    # mu is the engine's log-prob of the sampled token: equal to a transformers forward of the same weights.
    hf = AutoModelForCausalLM.from_pretrained(f"{tiny_world['dir']}/student", dtype=torch.float32)
    flat = [s for g in rollout_out for s in g]
    ref = hf_logprobs(hf, [s.prompt_ids + s.response_ids for s in flat], [len(s.prompt_ids) for s in flat])
    assert max_diff([s.rollout_logprobs for s in flat], ref) < 1e-3


def test_teacher_actor_scores_student_samples(actors, rollout_out, ray_local, tiny_world):
    _, teacher = actors
    flat = [s for g in rollout_out for s in g]
    seqs, plens = [s.prompt_ids + s.response_ids for s in flat], [len(s.prompt_ids) for s in flat]
    scores = ray_local.get(teacher.score.remote(seqs, plens, 0))
    hf = AutoModelForCausalLM.from_pretrained(f"{tiny_world['dir']}/teachers/rev", dtype=torch.float32)
    ref = hf_logprobs(hf, seqs, plens)
    assert max_diff([s.logprobs for s in scores], ref) < 1e-3
    assert all(s.topk_ids is None for s in scores)
    # Full-vocabulary top-k: a proper distribution that contains the scored token, in rank order.
    full = ray_local.get(teacher.score.remote(seqs[:4], plens[:4], -1))
    vocab = hf.config.vocab_size
    for sc, seq, p in zip(full, seqs, plens, strict=False):
        for t, (ids_k, lps_k) in enumerate(zip(sc.topk_ids.tolist(), sc.topk_logprobs.tolist(), strict=True)):
            assert len(ids_k) == vocab == len(set(ids_k))
            assert abs(torch.tensor(lps_k).logsumexp(0).item()) < 1e-3
            assert lps_k == sorted(lps_k, reverse=True)
            assert lps_k[ids_k.index(seq[p + t])] == pytest.approx(sc.logprobs[t], abs=1e-5)
    top3 = ray_local.get(teacher.score.remote(seqs[:2], plens[:2], 3))
    assert all(len(k) == 3 for sc in top3 for k in sc.topk_ids)


def _sgd_on(hf, seqs: list[list[int]], steps: int = 3) -> None:
    """A real optimizer update of the trainer-side model: AdamW on the NLL of `seqs`, trainable weights only."""
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        loss = -sum(hf(torch.tensor([s])).logits.log_softmax(-1)[0, :-1].gather(-1, torch.tensor(s[1:])[:, None]).sum()
                    for s in seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_weight_sync_makes_engine_match_trainer(actors, rollout_out, ray_local, tiny_world):
    student, _ = actors
    flat = [s for g in rollout_out for s in g][:12]
    seqs, plens = [s.prompt_ids + s.response_ids for s in flat], [len(s.prompt_ids) for s in flat]
    hf = AutoModelForCausalLM.from_pretrained(f"{tiny_world['dir']}/student", dtype=torch.float32)
    engine_before = ray_local.get(student.score_tokens.remote(seqs, plens))
    assert max_diff(engine_before, hf_logprobs(hf, seqs, plens)) < 1e-3
    # A real optimizer update of the trainer-side model (all weights, experts included).
    _sgd_on(hf, seqs)
    updated = hf_logprobs(hf, seqs, plens)
    stale = ray_local.get(student.score_tokens.remote(seqs, plens))
    assert max_diff(stale, updated) > 1e-2, "the update must change log-probs measurably"
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    ray_local.get(student.update_weights.remote(sd))
    synced = ray_local.get(student.score_tokens.remote(seqs, plens))
    assert max_diff(synced, updated) < 1e-3
    assert ray_local.get(student.ready.remote())["weight_version"] == 1
    # Sampling after the sync uses the new weights too.
    new = ray_local.get(student.generate.remote([plens and seqs[0][: plens[0]]], n=2, max_tokens=8, seed=3))[0]
    ref = hf_logprobs(hf, [s.prompt_ids + s.response_ids for s in new], [len(s.prompt_ids) for s in new])
    assert max_diff([s.rollout_logprobs for s in new], ref) < 1e-3


def test_partial_weight_sync_with_frozen_experts(actors, rollout_out, ray_local, tiny_world):
    """With frozen parameters (trainer.freeze) a sync sends only the trained tensors: the engine keeps the rest,
    re-prepares only the MoE expert layers it received, and still matches the trainer's model exactly. (Packing
    a layer that was not reloaded scrambles it: an unconditional repack fails this test.)"""
    student, _ = actors
    flat = [s for g in rollout_out for s in g][:12]
    seqs, plens = [s.prompt_ids + s.response_ids for s in flat], [len(s.prompt_ids) for s in flat]
    hf = AutoModelForCausalLM.from_pretrained(f"{tiny_world['dir']}/student", dtype=torch.float32)
    ray_local.get(student.update_weights.remote({k: v.clone() for k, v in hf.state_dict().items()}))
    # Layer 0's experts and every router frozen; the rest (layer 1's experts included) trained.
    frozen = {n for n, _ in hf.named_parameters() if n.startswith("model.layers.0.mlp.experts") or ".mlp.gate." in n}
    assert frozen and any(n.startswith("model.layers.1.mlp.experts") for n, _ in hf.named_parameters())
    for n, p in hf.named_parameters():
        p.requires_grad_(n not in frozen)
    _sgd_on(hf, seqs)
    updated = hf_logprobs(hf, seqs, plens)
    sent = {k: v.detach().clone() for k, v in hf.state_dict().items() if k not in frozen}
    ray_local.get(student.update_weights.remote(sent, 7))
    assert max_diff(ray_local.get(student.score_tokens.remote(seqs, plens)), updated) < 1e-3
    assert ray_local.get(student.ready.remote())["weight_version"] == 7

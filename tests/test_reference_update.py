"""Equal learning per step (DESIGN.md, "Equal learning per step"): on one fixed batch -- the same sampled tokens,
the same teacher distributions -- mopd's Trainer takes the same update as a reference on-policy distillation step
written here in plain torch (TRL 1.16 DistillationTrainer's beta=1 loss: exact full-vocabulary reverse
KL(student || teacher) at every response position up to and including EOS, sum over those positions / their count,
gradient clipped to total norm 1, then torch AdamW, no weight decay).

Adam's first update is lr * g / (|g| + eps) (bias-corrected), i.e. about lr * sign(g): for the few elements whose
gradient is within float rounding of eps (1e-8; e.g. lm_head rows of tokens with ~0 probability), its sign is decided
by rounding. Parameters are therefore compared on the elements with |g| >= 1e-6, and the rest is covered by checking
that mopd's parameters are exactly torch AdamW applied to mopd's own clipped gradient.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_models

from mopd.batch import build_batch
from mopd.config import load_config
from mopd.producer import ScoredSample
from mopd.trainer import Trainer
from rollout.types import Sample
from teachers.hf_teacher import HfTeacher

LR = 3e-3
TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return save_tiny_models(d), d


def fixed_batch(tok, d):
    """12 responses of 1..6 tokens sampled from the student, every other one ended by EOS (positions the loss
    must cover); teacher full-vocabulary log-probs from the hf backend; mu = the student's own log-probs."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(d / "student", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts, resps = [], []
    for i in range(12):
        p = tok.encode(f"add:{i:02d}+{3 * i:02d}=", add_special_tokens=False)
        ids = torch.tensor([p])
        n = 1 + i % 6
        with torch.no_grad():
            for _ in range(n - (i % 2 == 0)):
                probs = student(input_ids=ids).logits[0, -1].softmax(-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)[None]], 1)
        r = ids[0, len(p):].tolist() + ([tok.eos_token_id] if i % 2 == 0 else [])
        prompts.append(p)
        resps.append(r)
    scores = HfTeacher(str(d / "teacher")).score([p + r for p, r in zip(prompts, resps, strict=True)],
                                                  [len(p) for p in prompts], top_k=-1)
    samples = []
    with torch.no_grad():
        for i, (p, r, sc) in enumerate(zip(prompts, resps, scores, strict=True)):
            lp = student(input_ids=torch.tensor([p + r])).logits[0].float().log_softmax(-1)
            mu = [lp[len(p) - 1 + j, t].item() for j, t in enumerate(r)]
            samples.append(ScoredSample(row={"id": str(i), "domain": "add"}, group=i,
                                        sample=Sample(p, r, mu, "stop" if r[-1] == tok.eos_token_id else "length"),
                                        teacher="t", teacher_logprobs=sc.logprobs, teacher_topk_ids=sc.topk_ids,
                                        teacher_topk_logprobs=sc.topk_logprobs))
    return prompts, resps, build_batch(samples, tok.pad_token_id)


def reference_step(d, prompts, resps, agg, temperature=1.0):
    """The reference update, written from the definition (independent of mopd.losses); at `temperature` T both
    distributions are softmax(logits / T), as in TRL's loss."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(d / "student", dtype=torch.float32).train()
    teacher = AutoModelForCausalLM.from_pretrained(d / "teacher", dtype=torch.float32).eval()
    L = max(len(p) + len(r) for p, r in zip(prompts, resps, strict=True))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    att = torch.zeros_like(ids)
    mask = torch.zeros(len(prompts), L - 1)
    for b, (p, r) in enumerate(zip(prompts, resps, strict=True)):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        att[b, :len(p) + len(r)] = 1
        mask[b, len(p) - 1:len(p) - 1 + len(r)] = 1  # every response position, EOS included
    with torch.no_grad():
        lt = (teacher(input_ids=ids, attention_mask=att).logits[:, :-1].float() / temperature).log_softmax(-1)
    ls = (student(input_ids=ids, attention_mask=att).logits[:, :-1].float() / temperature).log_softmax(-1)
    kl = (ls.exp() * (ls - lt)).sum(-1) * mask
    loss = kl.sum() / mask.sum() if agg == "token-mean" else (kl.sum(1) / mask.sum(1)).mean()
    loss.backward()
    grad = {n: p.grad.clone() for n, p in student.named_parameters()}
    norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0))
    torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0).step()
    return float(loss.detach()), grad, norm, {n: p.detach().clone() for n, p in student.named_parameters()}


@pytest.fixture(scope="module")
def fixed(models):
    return fixed_batch(*models)


# token-mean is TRL's normaliser (sum over the batch's response positions / their count); mopd's default
# seq-mean-token-mean is checked against the same reference with that normaliser. Micro-batches of 5 rows
# accumulate the gradient over 3 forwards. algorithm.kl_temperature=0.7: both distributions tempered (TRL's loss
# at sampling temperature 0.7), from the teacher's full-vocabulary log-probs at temperature 1.
@pytest.mark.parametrize(("agg", "micro", "temp"), [("token-mean", 64, 1.0), ("token-mean", 5, 1.0),
                                                    ("seq-mean-token-mean", 5, 1.0), ("token-mean", 5, 0.7)])
def test_one_step_equals_reference_distillation_update(models, fixed, agg, micro, temp):
    _, d = models
    prompts, resps, batch = fixed
    ref_loss, ref_grad, ref_norm, ref_params = reference_step(d, prompts, resps, agg, temp)

    cfg = load_config("configs/quickstart.yaml", [
        f"student.path={d}/student", "algorithm.objective=reverse_kl", "algorithm.teacher_top_k=-1",
        f"algorithm.loss_agg_mode={agg}", "algorithm.correction=icepop", f"trainer.lr={LR}", "trainer.grad_clip=1.0",
        "trainer.weight_decay=0.0", "trainer.warmup_steps=0", "trainer.lr_schedule=constant",
        f"trainer.micro_batch_size={micro}", f"algorithm.kl_temperature={temp}"])
    tr = Trainer(cfg, str(d / "student"))
    p0 = {n: p.detach().clone() for n, p in tr.unwrapped.named_parameters()}
    seen: dict = {}
    clip = tr.acc.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        seen["grad"] = {n: p.grad.clone() for n, p in tr.unwrapped.named_parameters()}
        out = clip(params, max_norm)
        seen["clipped"] = {n: p.grad.clone() for n, p in tr.unwrapped.named_parameters()}
        return out

    tr.acc.clip_grad_norm_ = spy
    m = tr.step(batch)
    params = {n: p.detach().clone() for n, p in tr.unwrapped.named_parameters()}

    assert abs(m["icepop/masked_frac"]) == 0.0 and abs(m["rollout_corr/rollout_is_mean"] - 1) < 1e-5
    assert m["actor/lr"] == pytest.approx(LR, rel=1e-12)  # constant schedule: lr at step 1 and after
    assert abs(m["actor/loss"] - ref_loss) <= TOL
    assert abs(m["actor/grad_norm"] - ref_norm) <= TOL * ref_norm
    for n, g in ref_grad.items():
        assert (seen["grad"][n] - g).abs().max() <= TOL, n
    for n, p in ref_params.items():
        sure = ref_grad[n].abs() >= 1e-6
        diff = (params[n] - p)[sure]
        assert diff.numel() == 0 or float(diff.abs().max()) <= TOL, n
        # the rest: mopd's optimizer is torch AdamW on its own clipped gradient, exactly
        q = p0[n].clone().requires_grad_(True)
        q.grad = seen["clipped"][n]
        torch.optim.AdamW([q], lr=LR, weight_decay=0.0).step()
        assert torch.equal(q.detach(), params[n]), n

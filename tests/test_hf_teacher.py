"""The transformers teacher backend (`backend: hf`): exact scores against a plain forward in-process, several
teachers in one actor, the config and placement of actor groups, and (slow) the Ray actors a config starts,
scoring like the vLLM teacher, passing the preflight and training a few steps in one shared actor."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_config import REQUIRED_OVERRIDES, write_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd.config import ConfigError, load_config
from mopd.placement import plan_bundles
from mopd.world.models import build_teacher, save_model
from mopd.world.tokenizer import build_tokenizer
from teachers.hf_teacher import HfTeacher, HfTeacherGroup

TOL = 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_teachers")
    tok = build_tokenizer()
    for name, seed in (("a", 1), ("b", 2)):
        save_model(build_teacher(tok, seed=seed), tok, d / name)
    return d


def random_batch(seed: int, count: int = 9, vocab: int = 40) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (count,), generator=g)]
    plens = [int(torch.randint(1, len(s) + 1, (), generator=g)) for s in seqs]  # some responses empty
    return seqs, plens


def plain_logprobs(model, seq: list[int]) -> torch.Tensor:
    """log_softmax of one unpadded forward: row t is the distribution of token t + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)


def assert_matches_plain(model, seqs, plens, scores, top_k: int) -> float:
    worst = 0.0
    for s, p, sc in zip(seqs, plens, scores, strict=True):
        lp = plain_logprobs(model, s)
        ref = torch.tensor([lp[t - 1, s[t]].item() for t in range(p, len(s))])
        assert len(sc.logprobs) == len(s) - p
        if len(ref):
            worst = max(worst, (torch.tensor(sc.logprobs) - ref).abs().max().item())
        if top_k == 0:
            assert sc.topk_ids is None and sc.topk_logprobs is None
            continue
        assert len(sc.topk_ids) == len(s) - p
        for j, t in enumerate(range(p, len(s))):
            want_v, want_i = torch.topk(lp[t - 1], top_k if top_k > 0 else lp.shape[1])
            assert sc.topk_ids[j].tolist() == want_i.tolist()  # ranked by log-prob, like vLLM's prompt_logprobs
            worst = max(worst, (torch.tensor(sc.topk_logprobs[j]) - want_v).abs().max().item())
    assert worst <= TOL
    return worst


def test_scores_equal_a_plain_forward_full_vocab_and_top_k(folders):
    teacher = HfTeacher(str(folders / "a"), max_model_len=32)
    model = AutoModelForCausalLM.from_pretrained(folders / "a", dtype=torch.float32).eval()
    seqs, plens = random_batch(0)
    info = teacher.ready()
    assert info["max_logprobs"] == info["vocab_size"] == model.config.vocab_size
    for top_k in (0, 5, -1):
        assert_matches_plain(model, seqs, plens, teacher.score(seqs, plens, top_k), top_k)
    full = teacher.score(seqs, plens, -1)
    for sc in full:  # the whole vocabulary is a normalised distribution at every position
        for lps in sc.topk_logprobs:
            assert len(lps) == info["vocab_size"] and abs(torch.tensor(lps).logsumexp(0).item()) < 1e-5
    # Tiny prefill batches and log-softmax chunks give the same numbers: the budgets bound memory only.
    small = HfTeacher(str(folders / "a"), max_model_len=32, max_batch_tokens=20, chunk_elems=3 * info["vocab_size"])
    again = small.score(seqs, plens, 5)
    for x, y in zip(teacher.score(seqs, plens, 5), again, strict=True):
        assert (x.topk_ids == y.topk_ids).all()
        assert max([abs(u - v) for u, v in zip(x.logprobs, y.logprobs, strict=True)], default=0.0) <= TOL
    with pytest.raises(ValueError, match="max_model_len=32"):
        teacher.score([list(range(3, 36))], [2])
    with pytest.raises(ValueError, match="top_k=65"):
        teacher.score(seqs, plens, 65)
    with pytest.raises(ValueError, match="prompt_len 0"):
        teacher.score([[3, 4]], [0])


def test_two_teachers_in_one_group_each_score_with_their_own_model(folders):
    group = HfTeacherGroup({n: {"model_path": str(folders / n), "max_model_len": 32} for n in ("a", "b")})
    seqs, plens = random_batch(1)
    for name in ("a", "b"):
        model = AutoModelForCausalLM.from_pretrained(folders / name, dtype=torch.float32).eval()
        assert_matches_plain(model, seqs, plens, group.score_as(name, seqs, plens, -1), -1)
        assert group.ready_as(name)["group"] == ["a", "b"]
    a, b = group.score_as("a", seqs, plens, 0), group.score_as("b", seqs, plens, 0)
    assert max(abs(x - y) for sa, sb in zip(a, b, strict=True) for x, y in zip(sa.logprobs, sb.logprobs, strict=True)) > 0.01
    with pytest.raises(RuntimeError, match=r"holds 2 teachers \(a, b\).*score_as"):
        group.score(seqs, plens)
    with pytest.raises(KeyError, match="not in this hf actor group"):
        group.score_as("c", seqs, plens)
    single = HfTeacherGroup({"a": {"model_path": str(folders / "a"), "max_model_len": 32}})
    assert single.score(seqs, plens, 0) == a  # one teacher: the plain engine interface


def test_generate_greedy_and_seeded_sampling(folders):
    teacher = HfTeacher(str(folders / "a"), max_model_len=32)
    model = AutoModelForCausalLM.from_pretrained(folders / "a", dtype=torch.float32).eval()
    prompts, _ = random_batch(2, count=5)
    prompts = [p[:8] for p in prompts]
    greedy = teacher.generate(prompts, n=2, temperature=0.0, max_tokens=6)
    for p, group in zip(prompts, greedy, strict=True):
        assert len(group) == 2 and group[0].response_ids == group[1].response_ids
        s = group[0]
        assert s.prompt_ids == p and 1 <= len(s.response_ids) <= 6
        assert s.finish_reason == ("stop" if s.response_ids[-1] in teacher.eos_ids else "length")
        lp = plain_logprobs(model, p + s.response_ids)
        for t, tok in enumerate(s.response_ids):  # the argmax of an unpadded forward, with its log-prob
            row = lp[len(p) + t - 1]
            assert tok == int(row.argmax()) and abs(row[tok].item() - s.rollout_logprobs[t]) <= TOL
    sampled = teacher.generate(prompts, n=3, temperature=1.0, max_tokens=6, seed=7)
    assert any(len({tuple(s.response_ids) for s in g}) > 1 for g in sampled)
    # Request i samples with seed + i alone: the same samples in any batch around it.
    alone = teacher.generate(prompts[3:4], n=3, temperature=1.0, max_tokens=6, seed=10)
    assert [s.response_ids for s in alone[0]] == [s.response_ids for s in sampled[3]]
    for s in sampled[3]:  # raw (pre-temperature) log-probs of the sampled tokens, as vLLM reports them
        lp = plain_logprobs(model, s.prompt_ids + s.response_ids)
        ref = [lp[len(s.prompt_ids) + t - 1, tok].item() for t, tok in enumerate(s.response_ids)]
        assert max(abs(x - y) for x, y in zip(ref, s.rollout_logprobs, strict=True)) <= TOL
    hot = teacher.generate(prompts, n=1, temperature=0.5, top_p=1e-6, max_tokens=6, seed=3)  # top-p keeps the top token
    assert [g[0].response_ids for g in hot] == [g[0].response_ids for g in greedy]
    with pytest.raises(ValueError, match="max_model_len=32"):
        teacher.generate([list(range(3, 30))], max_tokens=6)


def test_generate_turns_stops_where_the_vllm_engine_does(folders):
    """One turn of multi-turn trajectories (the environment loop's call): each request ends at its EOS, at the
    token that completes one of its stop strings (kept, named in meta["stop"]), or at its own max_tokens;
    greedy tokens are an unpadded forward's argmax with its log-prob; a request's seed alone fixes its turn."""
    teacher = HfTeacher(str(folders / "a"), max_model_len=32)
    tok = AutoTokenizer.from_pretrained(folders / "a")
    model = AutoModelForCausalLM.from_pretrained(folders / "a", dtype=torch.float32).eval()
    prompts = [p[:8] for p in random_batch(4, count=6)[0]]
    stops = [list("aeiou13579"), list("bcdfg02468"), [], list("aeiou13579"), ["xyz"], list("hjklm")]
    limits = [6, 9, 5, 7, 8, 9]
    hits = 0
    for temperature in (0.0, 1.0):
        turns = teacher.generate_turns(prompts, max_tokens=limits, seeds=list(range(20, 26)), stop=stops,
                                       temperature=temperature)
        for p, st, m, s in zip(prompts, stops, limits, turns, strict=True):
            ids = s.response_ids
            assert s.prompt_ids == p and 1 <= len(ids) <= m
            # No stop string before the last token; the last one completes the one named, else EOS or the limit.
            assert not any(x in tok.decode(ids[:-1], skip_special_tokens=True) for x in st)
            hit = s.meta["stop"]
            if hit is not None:
                hits += 1
                assert hit in st and hit in tok.decode(ids, skip_special_tokens=True) and s.finish_reason == "stop"
            elif ids[-1] in teacher.eos_ids:
                assert s.finish_reason == "stop" and teacher.eos_ids[0] not in ids[:-1]
            else:
                assert s.finish_reason == "length" and len(ids) == m
            lp = plain_logprobs(model, p + ids)
            for t, x in enumerate(ids):
                row = lp[len(p) + t - 1]
                assert abs(row[x].item() - s.rollout_logprobs[t]) <= TOL
                if temperature == 0:
                    assert x == int(row.argmax())
    assert hits >= 4  # the stop strings did end turns
    # A request's turn depends on its own seed only: alone, or as the plain `generate` with that seed.
    alone = teacher.generate_turns(prompts[3:4], max_tokens=limits[3:4], seeds=[23], stop=stops[3:4])
    assert alone[0].response_ids == turns[3].response_ids
    plain = teacher.generate_turns(prompts[2:3], max_tokens=[5], seeds=[9], stop=[[]])[0]
    assert plain.response_ids == teacher.generate(prompts[2:3], max_tokens=5, seed=9)[0][0].response_ids
    with pytest.raises(ValueError, match="one max_tokens, seed and stop list per request"):
        teacher.generate_turns(prompts, max_tokens=[4], seeds=[1], stop=[[]])
    with pytest.raises(ValueError, match="max_model_len=32"):
        teacher.generate_turns([list(range(3, 30))], max_tokens=[6], seeds=[0], stop=[[]])


def test_actor_group_config_and_bundles():
    base = [*REQUIRED_OVERRIDES, "teachers.a.path=/x", "teachers.a.domains=[add]", "teachers.b.path=/y",
            "teachers.b.domains=[rev]", "teachers.c.path=/z", "teachers.c.domains=[sort]",
            "rollout.num_cpus_per_engine=0.25"]
    hf = ["teachers.a.backend=hf", "teachers.b.backend=hf", "teachers.a.actor_group=small",
          "teachers.b.actor_group=small"]
    cfg = load_config(None, [*base, *hf, "teachers.a.replicas=2", "teachers.b.replicas=2", "teachers.b.num_cpus=1"])
    plan = plan_bundles(cfg, trainer=False)
    # a and b share one actor per replica (the larger bundle of the two); c is a vLLM engine of its own.
    assert len(plan.roles["hf_group:small"]) == 2 and "teacher:a" not in plan.roles
    assert plan.actor_resources("hf_group:small") == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert plan.actor_resources("teacher:c") == {"num_cpus": 0.25, "num_gpus": 0.0}
    alone = load_config(None, [*base, "teachers.a.backend=hf"])
    assert "teacher:a" in plan_bundles(alone, trainer=False).roles  # hf without a group: its own bundle
    with pytest.raises(ConfigError, match=r"teachers\.c\.actor_group.*with backend hf"):
        load_config(None, [*base, "teachers.c.actor_group=small"])
    with pytest.raises(ConfigError, match=r"teachers\.b\.replicas.*got 1.*2, as teachers\.a\.replicas.*'small'"):
        load_config(None, [*base, *hf, "teachers.a.replicas=2"])
    with pytest.raises(ConfigError, match=r"teachers\.a\.backend.*vllm \| vllm_server \| hf"):
        load_config(None, [*base, "teachers.a.backend=torch"])


# -- through Ray, from a config (slow) ----------------------------------------------------------------
def _teachers(cfg):
    from mopd.engine_group import start_teachers
    from mopd.placement import reserve
    from teachers.registry import TeacherRegistry

    placement = reserve(cfg, trainer=False)
    return placement, start_teachers(cfg, TeacherRegistry.from_config(cfg), placement)


def _stop(placement, teachers):
    import ray

    for reps in teachers.values():
        for a in reps:
            ray.kill(a)
    placement.remove()


@pytest.mark.slow
def test_hf_and_vllm_teachers_score_alike_and_hf_passes_preflight(tiny_world, ray_local, tmp_path):
    import ray

    from mopd.data import encode_rows, load_rows
    from mopd.producer import ScoredSample, score_with_teachers, teacher_rollout
    from mopd.world.tasks import read_jsonl
    from teachers.preflight import format_report, run_preflight
    from teachers.registry import TeacherRegistry

    d = tiny_world["dir"]
    tok = AutoTokenizer.from_pretrained(f"{d}/student")
    rows = [r for r in read_jsonl(f"{d}/data/eval.jsonl") if r["domain"] in ("add", "rev")][::3][:10]
    student = HfTeacher(f"{d}/student", max_model_len=64)  # the student's own temperature-1 samples
    groups = student.generate(encode_rows(tok, rows, 32), n=1, temperature=1.0, max_tokens=12, seed=5)

    def samples():
        return [ScoredSample(row=r, group=i, sample=g[0]) for i, (r, g) in enumerate(zip(rows, groups, strict=True))]

    teachers = {"add_teacher": {"path": f"{d}/teachers/add", "domains": ["add"]},
                "rev_teacher": {"path": f"{d}/teachers/rev", "domains": ["rev"]}}
    vllm_cfg = load_config(write_config(tmp_path / "v.yaml", tiny_world, teachers))
    hf_teachers = {n: {**t, "backend": "hf", "actor_group": "small", "replicas": 2} for n, t in teachers.items()}
    hf_cfg = load_config(write_config(tmp_path / "h.yaml", tiny_world, hf_teachers))
    results = {}
    for name, cfg in (("vllm", vllm_cfg), ("hf", hf_cfg)):
        placement, handles = _teachers(cfg)
        try:
            ray.get([a.ready.remote() for reps in handles.values() for a in reps])
            scored = samples()
            score_with_teachers(handles, TeacherRegistry.from_config(cfg), scored, top_k=-1)
            results[name] = scored
            if name == "hf":
                # One process per replica holds both teachers; replicas are separate processes.
                pid = [[ray.get(a.__ray_call__.remote(lambda self: __import__("os").getpid())) for a in handles[n]]
                       for n in ("add_teacher", "rev_teacher")]
                assert pid[0] == pid[1] and pid[0][0] != pid[0][1]
                checks = run_preflight(cfg, handles, tok, load_rows(cfg.data.train_files))
                report = format_report(checks)
                assert all(c.ok for c in checks), report
                for line in ["ok    max_logprobs   [replica 1] 64 >= 64", "vs replica 0: 0", "ok    normalised"]:
                    assert line in report, (line, report)
                greedy = teacher_rollout(handles, TeacherRegistry.from_config(cfg), encode_rows(tok, rows, 32), rows,
                                         n=1, temperature=0.0, max_tokens=12, seed=0)
                assert [s.teacher for s in greedy] == [f"{r['domain']}_teacher" for r in rows]
                assert all(s.sample.finish_reason in ("stop", "length") and s.sample.response_ids for s in greedy)
        finally:
            _stop(placement, handles)
    sampled = full = 0.0
    for v, h in zip(results["vllm"], results["hf"], strict=True):
        assert v.teacher == h.teacher and len(h.teacher_logprobs) == len(h.sample.response_ids)
        sampled = max([sampled] + [abs(x - y) for x, y in zip(v.teacher_logprobs, h.teacher_logprobs, strict=True)])
        for vi, vl, hi, hl in zip(v.teacher_topk_ids, v.teacher_topk_logprobs, h.teacher_topk_ids,
                                  h.teacher_topk_logprobs, strict=True):
            assert sorted(vi.tolist()) == sorted(hi.tolist()) == list(range(64))  # the whole vocabulary at every position
            full = max(full, (torch.tensor(vl)[torch.tensor(vi).argsort()] - torch.tensor(hl)[torch.tensor(hi).argsort()])
                       .abs().max().item())
    print(f"hf vs vLLM, fp32: max |diff| sampled-token log-probs {sampled:.2e}, full-vocabulary top-k {full:.2e}")
    assert sampled <= TOL and full <= TOL


@pytest.mark.slow
def test_train_two_steps_with_three_hf_teachers_in_one_actor(tiny_world, ray_local, tmp_path):
    from mopd.jsonl import read_metrics
    from mopd.train import train

    d = tiny_world["dir"]
    teachers = {f"{dom}_teacher": {"path": f"{d}/teachers/{dom}", "domains": [dom], "backend": "hf",
                                   "actor_group": "world"} for dom in ("add", "rev", "sort")}
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_world, teachers, logging={"run_dir": str(tmp_path / "run")},
                                   trainer={"steps": 2}))
    train(cfg, log=lambda *_: None)
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "actor/grad_norm" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert math.isfinite(m["mopd/teacher_kl"]), m

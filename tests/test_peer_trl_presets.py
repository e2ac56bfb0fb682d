"""benchmarks/peer_trl.py's presets and its scoring function, without TRL (no test imports it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import yaml

from mopd.config import load_config
from mopd.world import world_config
from mopd.world.models import build_student, num_params
from mopd.world.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("peer_trl", ROOT / "benchmarks" / "peer_trl.py")
peer_trl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_trl)


def test_the_long_preset_sets_long_responses_and_flags_still_win():
    args, over = peer_trl.parse_args(["--preset", "long", "trainer.seed=3"])
    assert (args.task, args.max_new_tokens, args.steps, args.mopd_steps, args.mopd_k1) == ("swap", 272, 30, 40, True)
    assert args.lr == 1e-3 and args.eval_every == 5  # 3e-3 diverges on this task
    assert args.prompts == 32 and args.temperature == 1.0  # the defaults' otherwise
    assert over == ["trainer.seed=3"]
    args, _ = peer_trl.parse_args(["--preset", "long", "--steps", "5", "--max-new-tokens", "300"])
    assert (args.steps, args.max_new_tokens, args.mopd_steps) == (5, 300, 40)
    default, _ = peer_trl.parse_args([])
    assert (default.task, default.max_new_tokens, default.steps, default.mopd_steps, default.mopd_k1) == (
        "add", 8, 300, 600, False)


def test_the_long_preset_config_fits_its_world_and_student(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args, _ = peer_trl.parse_args(["--preset", "long"])
    (tmp_path / "mopd.yaml").write_text(peer_trl._mopd_yaml(args, tmp_path))
    cfg = load_config(tmp_path / "mopd.yaml")
    world = world_config(cfg)
    assert world == world_config(load_config("configs/quickstart_reason.yaml"))  # the same world, not a rebuild
    assert list(cfg.teachers) == ["swap_teacher"] and cfg.student.path == peer_trl.LONG_STUDENT["dir"]
    assert cfg.rollout.max_tokens == 272 >= 256 and cfg.data.max_prompt_tokens + 272 + 1 <= world.max_positions
    assert yaml.safe_load((tmp_path / "mopd.yaml").read_text())["trainer"]["steps"] == 40  # mopd runs past TRL's 30
    # The student is a bigger Qwen3-MoE than the world's: >= 10M parameters.
    size = peer_trl.LONG_STUDENT["student_size"]
    n = num_params(build_student(build_tokenizer(world.max_positions), 0, **size))
    assert 10e6 <= n <= 20e6, n


def test_reverse_kl_with_a_kv_cache_equals_the_exact_decode():
    tok = build_tokenizer()
    student = build_student(tok, 0, num_hidden_layers=1).eval()
    teacher = build_student(tok, 1, num_hidden_layers=1).eval()
    prompts = [tok.encode("swap:(abcde),ab=", add_special_tokens=False), tok.encode("add:12+34=", add_special_tokens=False)]
    kw = dict(samples=2, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=7)
    exact = peer_trl.reverse_kl(student, teacher, prompts, 24, **kw)
    cached = peer_trl.reverse_kl(student, teacher, prompts, 24, use_cache=True, **kw)
    assert torch.allclose(torch.tensor(exact), torch.tensor(cached), rtol=1e-4), (exact, cached)
    assert exact[0] > 0 and exact[1] > 0


def test_the_seed_tables_give_each_sides_checkpoint_kl_spread_and_time_ratios():
    """`--seeds`: per side, the KL at a third / two thirds / all of the steps as mean [min, max] over the seeds,
    the wall to TRL's final KL as a multiple of TRL's, and whether mopd's mean lies inside TRL's range."""
    plan = {"steps": 300}

    def curve(kls, wall_per_step):
        return [{"step": s, "wall_s": s * wall_per_step, "seq_kl": kl} for s, kl in zip((0, 100, 200, 300), kls,
                                                                                        strict=True)]
    rows = []
    for seed, (trl, k0, k1) in enumerate([((6, 4, 3, 2), (6, 4.5, 3.2, 2.5), (6, 5, 4, 1.9)),
                                          ((6, 5, 2, 1), (6, 4.4, 2.6, 1.5), (6, 5, 3, 0.9))]):
        curves = {"trl": curve(trl, 0.1), "mopd": curve(k0, 0.2), "mopd_k1": curve(k1, 0.15)}
        results = {x: {"train_kl": [1.0] * 300, "wall_s": 300 * w} for x, w in (("trl", 0.1), ("mopd", 0.2),
                                                                                   ("mopd_k1", 0.15))}
        rows.append(peer_trl.seed_summary({**plan, "seed": seed}, results, curves))
    assert rows[0]["mopd_kl@100"] == 4.5 and rows[1]["trl_kl@200"] == 2
    assert rows[0]["mopd_reach_x"] != rows[0]["mopd_reach_x"]  # never reached TRL's 2.0: NaN, not a ratio
    assert rows[0]["mopd_k1_reach_x"] == 1.5 and rows[1]["mopd_wall_x"] == 2.0
    table = peer_trl.seed_table(rows)
    assert "| reverse KL / seq, step 100 | 4.500 [4.000, 5.000] | 4.450 [4.400, 4.500] | 5.000 [5.000, 5.000] |" in table
    assert "| training wall to TRL's final KL, x TRL's | 1.000 [1.000, 1.000] | - | 1.500 [1.500, 1.500] |" in table
    assert "mopd k=0's mean KL against TRL's range: step 100 inside, step 200 inside, step 300 inside" in table
    assert "mopd k=1's mean KL against TRL's range: step 100 inside, step 200 outside, step 300 inside" in table

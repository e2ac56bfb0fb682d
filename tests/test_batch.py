"""Scored samples -> padded `TrainBatch`: positions, top-k, R3 records, scores and groups, `select`.

Hand-written samples and hand-worked expectations. Position convention (mopd/batch.py): `*_BT` index the
*predicting* position t of `input_ids_BL`, so response token j of a sample with prompt length P sits at
input position P + j and is predicted at t = P - 1 + j.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from mopd.batch import TrainBatch, build_batch
from mopd.losses import reverse_kl_loss
from mopd.samples import ScoredSample
from rollout.scoring import pack_topk
from rollout.types import Sample

PAD = 0
# What build_batch writes into the top-k slots a position does not use: the losses skip negative ids.
NO = -1


def scored(prompt, response, *, mu=None, teacher=None, topk=None, score=None, group=0, domain="add", routed=None,
           row_id="r"):
    mu = [-0.1 * (j + 1) for j in range(len(response))] if mu is None else mu
    ids, lps = pack_topk(*topk) if topk is not None else (None, None)
    return ScoredSample(row={"id": row_id, "domain": domain}, group=group,
                        sample=Sample(list(prompt), list(response), mu, "stop", routed),
                        teacher="t" if teacher is not None else "", teacher_logprobs=teacher or [],
                        teacher_topk_ids=ids, teacher_topk_logprobs=lps, score=score)


@pytest.fixture
def two():
    """s0: prompt 3 + response 2 (5 tokens); s1: prompt 2 + response 4 (6 tokens, the longest)."""
    s0 = scored([5, 6, 7], [8, 9], mu=[-0.25, -0.5], teacher=[-1.0, -2.0],
                topk=([[8, 3], [9]], [[-0.5, -1.5], [-0.75]]), score=1.0, group=0, domain="add", row_id="a")
    s1 = scored([5, 6], [10, 11, 12, 1], mu=[-1.0, -2.0, -3.0, -4.0], teacher=[-0.5, -0.25, -0.125, -0.0625],
                score=None, group=1, domain="rev", row_id="b")
    return s0, s1


def test_positions_mask_and_padding(two):
    b = build_batch(list(two), PAD)
    assert b.input_ids_BL.tolist() == [[5, 6, 7, 8, 9, PAD], [5, 6, 10, 11, 12, 1]]
    assert b.attention_mask_BL.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # T = L - 1; the response of s0 is predicted at t = 2, 3; that of s1 at t = 1..4.
    assert b.mask_BT.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert b.rollout_logprobs_BT.tolist() == [[0, 0, -0.25, -0.5, 0], [0, -1.0, -2.0, -3.0, -4.0]]
    assert b.teacher_logprobs_BT.tolist() == [[0, 0, -1.0, -2.0, 0], [0, -0.5, -0.25, -0.125, -0.0625]]
    assert b.size == 2 and b.domains == ["add", "rev"]


def test_mask_marks_exactly_the_response_tokens_at_their_predicting_position(two):
    """Property: the token each masked position predicts is the response token, in order, and the
    masked count per row is the response length."""
    b = build_batch(list(two), PAD)
    for row, s in enumerate(two):
        pos = b.mask_BT[row].nonzero().squeeze(-1)
        assert b.input_ids_BL[row, pos + 1].tolist() == s.sample.response_ids
        assert b.rollout_logprobs_BT[row, pos].tolist() == s.sample.rollout_logprobs
        assert b.teacher_logprobs_BT[row, pos].tolist() == s.teacher_logprobs
        # Only real tokens are attended; every predicted response token is an attended one.
        assert bool(b.attention_mask_BL[row, pos + 1].all())


def test_sample_without_teacher_scores_gets_zeros(two):
    """orm / sft batches: no teacher log-probs at all; the tensor is zeros (never NaN)."""
    s0, s1 = two
    s0.teacher_logprobs = []
    b = build_batch([s0, s1], PAD)
    assert b.teacher_logprobs_BT[0].tolist() == [0.0] * 5
    assert b.teacher_logprobs_BT[1, 1:].tolist() == [-0.5, -0.25, -0.125, -0.0625]


def test_ragged_topk_is_padded_to_the_largest_k(two):
    b = build_batch(list(two), PAD)
    ninf = -math.inf
    assert b.teacher_topk_ids_BTK is not None and b.teacher_topk_logprobs_BTK is not None
    assert tuple(b.teacher_topk_ids_BTK.shape) == (2, 5, 2)  # K = max k over every position of the batch
    assert b.teacher_topk_ids_BTK[0].tolist() == [[NO, NO], [NO, NO], [8, 3], [9, NO], [NO, NO]]
    assert b.teacher_topk_logprobs_BTK[0].tolist() == [[ninf, ninf], [ninf, ninf], [-0.5, -1.5], [-0.75, ninf],
                                                       [ninf, ninf]]
    # s1 has no top-k: every slot is padding with log-prob -inf (probability 0).
    assert b.teacher_topk_ids_BTK[1].eq(NO).all() and b.teacher_topk_logprobs_BTK[1].eq(ninf).all()
    assert b.teacher_topk_ids_BTK.dtype == torch.long


def test_read_only_topk_arrays_as_ray_delivers_them_build_silently(two):
    """Arrays deserialized by Ray are read-only views of its buffer: the batch copies them without a warning and
    without touching them."""
    s0, s1 = two
    want = build_batch([s0, s1], PAD)
    for a in (s0.teacher_topk_ids, s0.teacher_topk_logprobs):
        a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = build_batch([s0, s1], PAD)
    assert torch.equal(got.teacher_topk_ids_BTK, want.teacher_topk_ids_BTK)
    assert torch.equal(got.teacher_topk_logprobs_BTK, want.teacher_topk_logprobs_BTK)
    assert s0.teacher_topk_ids.tolist() == [[8, 3], [9, -1]]


def test_topk_rows_beyond_the_response_are_refused(two):
    s0, s1 = two
    s0.teacher_topk_ids, s0.teacher_topk_logprobs = pack_topk([[8], [9], [1]], [[-0.5], [-0.75], [-1.0]])
    with pytest.raises(ValueError, match="row 'a'.*for 2 response tokens"):
        build_batch([s0, s1], PAD)


def test_no_topk_anywhere_gives_none(two):
    s0, s1 = two
    s0.teacher_topk_ids, s0.teacher_topk_logprobs = None, None
    b = build_batch([s0, s1], PAD)
    assert b.teacher_topk_ids_BTK is None and b.teacher_topk_logprobs_BTK is None


def test_reverse_kl_of_a_sample_does_not_depend_on_its_batch_mates(two):
    """A position with k = 1 must give the same reverse KL whether or not another sample makes K = 2."""
    s0, s1 = two
    s1.teacher_topk_ids, s1.teacher_topk_logprobs = pack_topk([[11], [12], [1], [5]], [[-0.1], [-0.2], [-0.3], [-0.4]])
    s0.teacher_topk_ids, s0.teacher_topk_logprobs = pack_topk([[8], [9]], [[-0.5], [-0.75]])
    alone = build_batch([s0, s1], PAD)  # K = 1 everywhere
    s0.teacher_topk_ids, s0.teacher_topk_logprobs = pack_topk([[8, 3], [9]], [[-0.5, -1.5], [-0.75]])
    mixed = build_batch([s0, s1], PAD)  # K = 2: s1's positions get one padded slot
    logits = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    kl = {}
    for name, b in (("alone", alone), ("mixed", mixed)):
        kl[name], _ = reverse_kl_loss(logits[1:], b.teacher_topk_ids_BTK[1:], b.teacher_topk_logprobs_BTK[1:],
                                      None, b.mask_BT[1:])
    assert kl["mixed"].item() == pytest.approx(kl["alone"].item(), rel=1e-6)


def test_r3_records_are_copied_and_missing_ones_are_minus_one(two):
    s0, s1 = two
    layers, k = 2, 2
    # s0's record covers its 5 tokens; int16 as the engine returns it.
    rec0 = np.arange(5 * layers * k, dtype=np.int16).reshape(5, layers, k) % 8
    s0.sample.routed_experts = rec0
    b = build_batch([s0, s1], PAD)
    r = b.routed_experts_BLNK
    assert r is not None and tuple(r.shape) == (2, 6, layers, k) and r.dtype == torch.long
    assert r[0, :5].tolist() == rec0.astype(np.int64).tolist()
    assert r[0, 5].eq(-1).all()  # padding
    assert r[1].eq(-1).all()  # a sample without a record: no position is replayed
    # A record shorter than the sequence (the engine routed every token but the last sampled one).
    s1.sample.routed_experts = np.full((5, layers, k), 3, dtype=np.int16)
    r = build_batch([s0, s1], PAD).routed_experts_BLNK
    assert r[1, :5].eq(3).all() and r[1, 5].eq(-1).all()


def test_no_r3_records_gives_none(two):
    assert build_batch(list(two), PAD).routed_experts_BLNK is None


def test_scores_groups_and_domains(two):
    s0, s1 = two
    s2 = scored([4], [7, 7], score=0.0, group=1, domain="rev")
    b = build_batch([s0, s1, s2], PAD)
    assert b.scores_B[0].item() == 1.0 and math.isnan(b.scores_B[1].item()) and b.scores_B[2].item() == 0.0
    assert b.scores_B.dtype == torch.float32
    assert b.group_B.tolist() == [0, 1, 1] and b.group_B.dtype == torch.long
    assert b.domains == ["add", "rev", "rev"]


def _fields(b: TrainBatch) -> dict:
    return {k: getattr(b, k) for k in TrainBatch.__dataclass_fields__}


def _same(x: TrainBatch, y: TrainBatch, skip: tuple[str, ...] = ()) -> None:
    for k, v in _fields(x).items():
        if k in skip:
            continue
        w = getattr(y, k)
        if isinstance(v, torch.Tensor):
            assert isinstance(w, torch.Tensor) and torch.equal(v.nan_to_num(-7.0), w.nan_to_num(-7.0)), k
        else:
            assert v == w, k


def test_select_equals_building_from_the_chosen_samples(two):
    """Equivalence: selecting rows (in any order) == building the batch from those samples (same L)."""
    s0, s1 = two
    s0.sample.routed_experts = np.ones((5, 2, 2), dtype=np.int16)
    s2 = scored([4, 4], [7], score=0.5, group=2, domain="sort", topk=([[7, 2]], [[-0.1, -2.0]]))
    b = build_batch([s0, s1, s2], PAD)
    _same(b.select([1, 0]), build_batch([s1, s0], PAD))
    _same(b.select([0, 1, 2]), b)
    sub = b.select([2, 1])  # s1 is the longest, so L is unchanged
    _same(sub, build_batch([s2, s1], PAD), skip=("routed_experts_BLNK",))
    assert sub.routed_experts_BLNK is not None and sub.routed_experts_BLNK.eq(-1).all()  # neither has a record
    assert sub.domains == ["sort", "rev"] and sub.group_B.tolist() == [2, 1]


def test_select_keeps_absent_optionals_absent(two):
    b = build_batch([two[1]], PAD)
    assert b.teacher_topk_ids_BTK is None and b.routed_experts_BLNK is None
    s = b.select([0])
    assert s.teacher_topk_ids_BTK is None and s.teacher_topk_logprobs_BTK is None and s.routed_experts_BLNK is None
    assert torch.equal(s.input_ids_BL, b.input_ids_BL)

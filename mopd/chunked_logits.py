"""Per-token log-prob, entropy and reverse KL of the student with bounded memory, pure torch.

Why: the loss needs, at every response position, ``log p_theta(target)``, the entropy and the reverse KL
against the teacher -- all functions of the fp32 ``log_softmax`` over the whole vocabulary. Built for the
whole micro-batch at once, that ``[tokens, vocabulary]`` fp32 tensor is 8,192 x 152k x 4 B = 5 GB per
sequence, and autograd keeps several such tensors (logits, log-probs, the KL's intermediates) alive from
the forward until the backward. With ``chunk_tokens = C`` the positions are processed ``C`` at a time, each
chunk under ``torch.utils.checkpoint`` (non-reentrant): the forward frees a chunk's ``[C, V]`` tensors
before the next chunk starts, and the backward recomputes them one chunk at a time. The graph keeps only
the hidden states and the per-position results, so peak memory grows with ``C x V``, not ``N x V``, and
the gradients are those of the unchunked computation (same operations, same order within a position).

The price: the head (``lm_head``) and the softmax run twice (forward, then once more in the backward).

Callers pass only the positions that count (the response tokens, flattened to ``[N, H]``); padding and
prompt positions never reach the vocabulary dimension at all. :func:`hidden_and_head` gives the final
hidden states of a transformers causal LM without building its ``[B, L, V]`` logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mopd.losses import TOPK_MODES, _kl_terms, reverse_kl_per_token

__all__ = ["TokenStats", "token_stats", "hidden_and_head"]


@dataclass
class TokenStats:
    """Per-position results of :func:`token_stats`, each ``[N]`` float32 (fp32 whatever the model dtype).

    ``logprobs_N``, ``entropy_N`` and ``kl_N`` carry the gradient (to ``hidden_NH`` and the head's weight),
    so any of them, or a combination, can be a loss term; the masses are detached diagnostics.
    """

    logprobs_N: Tensor  # log p_theta(target) per position, with gradient
    entropy_N: Tensor  # -sum_v p log p per position, with gradient (usable as a bonus term)
    kl_N: Tensor | None  # reverse KL(p_theta || teacher) per position, with gradient; None without a teacher
    student_mass_N: Tensor | None  # detached: probability the student puts on the teacher's top-k set
    teacher_mass_N: Tensor | None  # detached: probability the teacher puts on its own top-k set


def _chunk_stats(
    hidden_CH: Tensor,
    targets_C: Tensor,
    topk_ids_CK: Tensor | None,
    topk_logprobs_CK: Tensor | None,
    lm_head: torch.nn.Module,
    topk_mode: str,
) -> tuple[Tensor, ...]:
    """Everything that touches the ``[C, V]`` logits of one chunk; only ``[C]`` tensors come out.

    Why one function: under checkpoint, whatever it builds is freed on return and rebuilt in the backward.
    """
    logp_CV = F.log_softmax(lm_head(hidden_CH).float(), dim=-1)
    lp_C = logp_CV.gather(-1, targets_C.long().unsqueeze(-1)).squeeze(-1)
    ent_C = -_kl_terms(logp_CV, torch.zeros_like(logp_CV)).sum(dim=-1)  # token_entropy's convention
    if topk_ids_CK is None or topk_logprobs_CK is None:
        return lp_C, ent_C
    kl_1C, s_mass_1C, t_mass_1C = reverse_kl_per_token(
        logp_CV.unsqueeze(0), topk_ids_CK.unsqueeze(0), topk_logprobs_CK.unsqueeze(0), topk_mode=topk_mode)
    return lp_C, ent_C, kl_1C.squeeze(0), s_mass_1C.squeeze(0), t_mass_1C.squeeze(0)


def token_stats(
    hidden_NH: Tensor,
    lm_head: torch.nn.Module,
    targets_N: Tensor,
    topk_ids_NK: Tensor | None = None,
    topk_logprobs_NK: Tensor | None = None,
    *,
    chunk_tokens: int = 0,
    topk_mode: str = "tail",
) -> TokenStats:
    """Log-prob of ``targets_N``, entropy and (with a teacher top-k) reverse KL at each of N positions.

    Args:
        hidden_NH: final hidden states of the positions that count (``[N, H]``, with gradient).
        lm_head: the model's output embedding (``model.get_output_embeddings()``, Linear H -> V). It is
            *called* (``lm_head(h)``), never read as a weight, so DeepSpeed ZeRO-3's module hooks gather
            its partitioned weight, in the forward and again in the backward's recompute.
        targets_N: the token id scored at each position (int).
        topk_ids_NK, topk_logprobs_NK: the teacher's top-k (or full-vocabulary, K = V) ids and log-probs;
            a negative id marks a padding slot, and a position with no slot at all gets KL 0. As in
            :func:`mopd.losses.reverse_kl_per_token` (used here, per chunk): ids unique per position and
            ``< V``; the teacher side is detached. The *caller* sanitises non-finite teacher values, as
            :func:`mopd.losses.reverse_kl_loss` does: a NaN / +inf teacher log-prob would make that
            position's KL NaN, so set the ids of such positions to -1 first.
        chunk_tokens: 0 -- one chunk, plain autograd (the reference; ``[N, V]`` tensors live from the
            forward to the backward). ``C > 0`` -- chunks of C positions under non-reentrant checkpoint:
            only one chunk's ``[C, V]`` tensors exist at a time, in the forward and in the backward.
        topk_mode: ``"tail"`` or ``"renorm"`` (see :func:`mopd.losses.reverse_kl_per_token`).

    Returns:
        :class:`TokenStats`; ``kl_N`` and the masses are None when no teacher top-k is given.
    """
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 (0 = unchunked), got {chunk_tokens}")
    if topk_mode not in TOPK_MODES:
        raise ValueError(f"unknown topk_mode {topk_mode!r}; allowed: {' | '.join(TOPK_MODES)}")
    if hidden_NH.dim() != 2:
        raise ValueError(f"hidden_NH must be [N, H], got {tuple(hidden_NH.shape)}")
    N = hidden_NH.shape[0]
    if targets_N.shape != (N,):
        raise ValueError(f"targets_N must be [N] = [{N}], got {tuple(targets_N.shape)}")
    if (topk_ids_NK is None) != (topk_logprobs_NK is None):
        raise ValueError("give both topk_ids_NK and topk_logprobs_NK, or neither")
    with_kl = topk_ids_NK is not None and topk_logprobs_NK is not None
    if with_kl:
        assert topk_ids_NK is not None and topk_logprobs_NK is not None
        if topk_ids_NK.shape != topk_logprobs_NK.shape or topk_ids_NK.dim() != 2 or topk_ids_NK.shape[0] != N:
            raise ValueError(f"teacher ids {tuple(topk_ids_NK.shape)} / log-probs {tuple(topk_logprobs_NK.shape)} "
                             f"must both be [N, K] with N = {N}")
        topk_logprobs_NK = topk_logprobs_NK.detach()

    if chunk_tokens == 0 or N == 0:
        outs: tuple[Tensor, ...] = _chunk_stats(hidden_NH, targets_N, topk_ids_NK, topk_logprobs_NK, lm_head,
                                                topk_mode)
    else:
        # Without grad (e.g. pi_old) there is no graph to keep small: chunking alone bounds the memory.
        grad = torch.is_grad_enabled()
        parts: list[tuple[Tensor, ...]] = []
        for start in range(0, N, chunk_tokens):
            sl = slice(start, min(start + chunk_tokens, N))
            args = (hidden_NH[sl], targets_N[sl], topk_ids_NK[sl] if topk_ids_NK is not None else None,
                    topk_logprobs_NK[sl] if topk_logprobs_NK is not None else None, lm_head, topk_mode)
            parts.append(checkpoint(_chunk_stats, *args, use_reentrant=False) if grad else _chunk_stats(*args))
        outs = tuple(torch.cat(column) for column in zip(*parts, strict=True))

    if with_kl:
        lp_N, ent_N, kl_N, s_mass_N, t_mass_N = outs
        return TokenStats(lp_N, ent_N, kl_N, s_mass_N.detach(), t_mass_N.detach())
    lp_N, ent_N = outs
    return TokenStats(lp_N, ent_N, None, None, None)


# Config fields by which a transformers causal LM transforms its hidden states' projection before returning
# logits, with the value that means "no transformation". `lm_head(hidden)` is not `logits` otherwise.
_LOGIT_TRANSFORMS: dict[str, tuple[Any, ...]] = {
    "logit_scale": (None, 1.0),  # Cohere: logits * logit_scale
    "logits_scaling": (None, 1.0),  # Granite: logits / logits_scaling
    "final_logit_softcapping": (None, 0.0),  # Gemma 2/3: tanh soft-capping
    "output_multiplier_scale": (None, 1.0),
}


def hidden_and_head(
    model: torch.nn.Module, input_ids_BL: Tensor, attention_mask_BL: Tensor,
) -> tuple[Tensor, torch.nn.Module]:
    """Final hidden states ``[B, L, H]`` of a transformers causal LM and its output embedding module.

    Why: ``model(...).logits`` materialises ``[B, L, V]`` logits (plus an fp32 copy for the loss) for
    every position, prompt and padding included -- at 8k x 152k that is 5 GB per sequence in fp32. Running
    only the base decoder and projecting the positions that count with :func:`token_stats` never builds
    it. ``model`` is the unwrapped ``PreTrainedModel`` (``accelerator.unwrap_model``); the decoder is
    ``model.get_decoder()`` (for Qwen3 / Qwen3-MoE causal LMs in transformers 5.x that is ``model.model``).
    Module hooks on the decoder's layers (R3 routing replay, ZeRO-3 gathering) fire as in a full forward.

    Raises:
        NotImplementedError: the model's config transforms logits after ``lm_head`` (scale, soft-cap), so
            ``lm_head(hidden)`` would not be the model's logits.
    """
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, identity in _LOGIT_TRANSFORMS.items():
        value = getattr(text_config, name, None)
        if value not in identity:
            raise NotImplementedError(
                f"{type(model).__name__} has config.{name}={value!r}: its logits are not lm_head(hidden), "
                f"and chunked log-probs do not apply that transformation. Use the full forward (chunking off).")
    head = model.get_output_embeddings()
    if head is None:
        raise NotImplementedError(f"{type(model).__name__} has no output embeddings (not a causal LM head?)")
    decoder = model.get_decoder()
    if decoder is model:
        raise NotImplementedError(f"{type(model).__name__}.get_decoder() returned the model itself: "
                                  "cannot find the base model that returns hidden states")
    out = decoder(input_ids=input_ids_BL, attention_mask=attention_mask_BL, use_cache=False)
    return out.last_hidden_state, head

"""A light teacher backend (`backend: hf`): a plain transformers forward in a Ray actor.

Scoring is one prefill over prompt + response (no KV cache, no sampling): the exact log-softmax of the
teacher's logits, in fp32, at every response position, so the log-prob of each student token and its
top-k (or the whole vocabulary, `top_k = -1`) come out with the semantics of the vLLM teacher
(`rollout.scoring.prompt_logprobs_of`: temperature 1, top-k ranked by log-prob, no `max_logprobs` cap).
Several small teachers can share one actor (`teachers.<name>.actor_group`): one process, one set of torch
threads, the models loaded side by side, which is far less memory on a small machine than one vLLM engine
per teacher.

Memory stays bounded: sequences are prefilled in right-padded batches of at most `max_batch_tokens` padded
tokens (and about `logits_budget` logit elements), only positions from the first response token on get
logits, and the fp32 log-softmax runs over chunks of at most `chunk_elems` elements.

`generate` (the off-policy SFT baseline and the teachers' own evaluation) uses `model.generate`: greedy at
temperature 0, otherwise sampling with a `torch.Generator` per request (seeded `seed + i` like the vLLM
engine); each sampled token carries the model's raw (pre-temperature) log-prob, as vLLM's do.
`generate_turns` is one turn of multi-turn trajectories with the vLLM engine's signature and semantics (per
request max_tokens, seed and stop strings, matched on the detokenized new text and kept in the output), so the
rollout's environment loop (mopd/multiturn.py) drives an hf teacher as it drives a vLLM one.

The same classes run in-process (`HfTeacher`, `HfTeacherGroup`) and as Ray actors (`start_hf_group`).
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from typing import Any

import ray
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from rollout.actors import at
from rollout.envs import stop_in, turn_end
from rollout.scoring import TokenScores
from rollout.types import EngineSpec, Sample

TeacherScores = TokenScores

MAX_BATCH_TOKENS = 8192  # padded tokens per prefill forward
LOGITS_BUDGET = 1 << 26  # logit elements one prefill forward may return (more only for one long sequence)
CHUNK_ELEMS = 1 << 24  # [positions, vocab] elements per fp32 log-softmax (64 MB)
GENERATE_BATCH = 64  # prompts per `model.generate` call

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HfTeacher:
    """One teacher model: `ready()`, `score(sequences, prompt_lens, top_k)`, `generate(...)` and
    `generate_turns(...)` with the vLLM `TeacherEngine`'s signatures and results."""

    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int = 128, seed: int = 0,
                 device: str | None = None, max_batch_tokens: int = MAX_BATCH_TOKENS,
                 logits_budget: int = LOGITS_BUDGET, chunk_elems: int = CHUNK_ELEMS) -> None:
        t0 = time.perf_counter()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: allowed {' | '.join(_DTYPES)}")
        self.model_path, self.dtype, self.max_model_len, self.seed = model_path, dtype, max_model_len, seed
        self._rng = torch.Generator().manual_seed(seed)  # seeds of requests that bring none (like vLLM's seed)
        self.device = torch.device(device or "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype]).to(self.device).eval()
        text = self.model.config.get_text_config()
        self.vocab_size = int(text.vocab_size)
        gen = getattr(self.model, "generation_config", None)
        eos = _first_set(getattr(gen, "eos_token_id", None), getattr(text, "eos_token_id", None))
        self.eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]
        pad = _first_set(getattr(gen, "pad_token_id", None), getattr(text, "pad_token_id", None))
        self.pad_id = int(pad) if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        # Generation follows the caller's arguments only, as the vLLM engine's explicit SamplingParams do:
        # no penalties or warpers from the checkpoint's generation_config.json, just where to stop.
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids or None, pad_token_id=self.pad_id)
        self.max_batch_tokens, self.logits_budget, self.chunk_elems = max_batch_tokens, logits_budget, chunk_elems
        # Logits of the response positions only (most causal LMs take `logits_to_keep`; others return all).
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._tokenizer: Any = None  # loaded on the first multi-turn call (stop strings are text)
        self.startup_s = time.perf_counter() - t0

    def ready(self) -> dict:
        # Any top-k up to the whole vocabulary can be returned: `max_logprobs` is the vocabulary.
        return {"startup_s": self.startup_s, "weight_version": 0, "max_logprobs": self.vocab_size,
                "vocab_size": self.vocab_size, "max_model_len": self.max_model_len, "backend": "hf",
                "dtype": self.dtype, "device": str(self.device), "threads": torch.get_num_threads()}

    # -- scoring --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, sequences: list[list[int]], prompt_lens: list[int], top_k: int = 0) -> list[TeacherScores]:
        """The teacher's log-prob of every response token (positions >= prompt_len) of each sequence and,
        with `top_k` != 0, the top-k (-1: every token of the vocabulary) ranked by log-prob."""
        if len(sequences) != len(prompt_lens):
            raise ValueError(f"{len(sequences)} sequences but {len(prompt_lens)} prompt lengths")
        if not isinstance(top_k, int) or top_k < -1 or top_k > self.vocab_size:
            raise ValueError(f"top_k={top_k}: allowed -1 (the whole vocabulary), 0 (the sampled token only) or "
                             f"1..{self.vocab_size} (this teacher's vocabulary)")
        for i, (s, p) in enumerate(zip(sequences, prompt_lens, strict=True)):
            if len(s) > self.max_model_len:
                raise ValueError(f"sequence {i} has {len(s)} tokens, over the teacher's max_model_len="
                                 f"{self.max_model_len}; raise rollout.max_tokens/data.max_prompt_tokens consistently")
            if not 1 <= p <= len(s):
                raise ValueError(f"sequence {i}: prompt_len {p} must be in [1, {len(s)}] (the first token has "
                                 "no log-prob: a scored sequence starts with at least one prompt token)")
            bad = [t for t in s if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"sequence {i} holds token id {bad[0]}, outside this teacher's vocabulary "
                                 f"[0, {self.vocab_size})")
        out: list[TeacherScores | None] = [None] * len(sequences)
        for batch in self._batches(sequences):
            for i, sc in zip(batch, self._score_batch([sequences[i] for i in batch],
                                                      [prompt_lens[i] for i in batch], top_k), strict=True):
                out[i] = sc
        return out  # type: ignore[return-value]

    def _batches(self, sequences: list[list[int]]) -> list[list[int]]:
        """Indices in right-padded prefill batches, shortest first (little padding), each within the token
        and logits budgets (a single sequence always fits)."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        batches: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            width = len(sequences[i])  # the longest so far: `order` is ascending
            rows = (len(cur) + 1) * width
            if cur and (rows > self.max_batch_tokens or rows * self.vocab_size > self.logits_budget):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    def _score_batch(self, seqs: list[list[int]], plens: list[int], top_k: int) -> list[TeacherScores]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[b, :len(s)] = 1
        # Position p's logits predict token p + 1: responses need positions plen - 1 .. len - 2 only.
        first = min(plens) - 1
        keep = {"logits_to_keep": width - first} if self._keeps_logits else {}
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False,
                            **keep).logits
        first = width - logits.shape[1]  # logits[:, j] are position first + j's (all positions without keep)
        pairs = list(zip(seqs, plens, strict=True))
        rows = torch.cat([logits[b, p - 1 - first:len(s) - 1 - first] for b, (s, p) in enumerate(pairs)])
        targets = torch.tensor([t for s, p in pairs for t in s[p:]], dtype=torch.long, device=rows.device)
        sampled, ids_k, lps_k = [], [], []
        step = max(1, self.chunk_elems // self.vocab_size)
        for r in range(0, rows.shape[0], step):
            lp = torch.log_softmax(rows[r:r + step].float(), dim=-1)
            sampled.append(lp.gather(-1, targets[r:r + step, None])[:, 0].cpu())
            if top_k > 0:
                v, k = torch.topk(lp, top_k, dim=-1, sorted=True)
            elif top_k < 0:
                v, k = torch.sort(lp, dim=-1, descending=True, stable=True)
            if top_k != 0:
                ids_k.append(k.cpu())
                lps_k.append(v.cpu())
        flat = torch.cat(sampled).tolist() if sampled else []
        K = self.vocab_size if top_k < 0 else top_k
        ids_RK = (torch.cat(ids_k) if ids_k else torch.zeros(0, K, dtype=torch.long)).numpy() if top_k else None
        lps_RK = (torch.cat(lps_k) if lps_k else torch.zeros(0, K)).numpy() if top_k else None
        out, start = [], 0
        for s, p in zip(seqs, plens, strict=True):
            end = start + len(s) - p
            out.append(TeacherScores(flat[start:end], None if ids_RK is None else ids_RK[start:end],
                                     None if lps_RK is None else lps_RK[start:end]))
            start = end
        return out

    # -- generation -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_tokens: int = 16, seed: int | None = None) -> list[list[Sample]]:
        """`n` samples per prompt with the model's raw log-prob of each sampled token; greedy at temperature
        0 (then the n samples are equal), otherwise request i samples with a generator seeded `seed + i`."""
        for i, p in enumerate(prompt_ids):
            if len(p) + max_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_tokens={max_tokens} it exceeds the engine's "
                    f"max_model_len={self.max_model_len}. Shorten the prompt or raise data.max_prompt_tokens.")
            if not p:
                raise ValueError(f"prompt {i} is empty")
        if n < 1 or max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"n={n}, max_tokens={max_tokens}, temperature={temperature}, top_p={top_p}: need "
                             "n >= 1, max_tokens >= 1, temperature >= 0 and 0 < top_p <= 1")
        greedy = temperature == 0
        copies = 1 if greedy else n  # greedy samples are all equal: decode once, repeat
        per_call = max(1, GENERATE_BATCH // copies)
        result: list[list[Sample]] = []
        for start in range(0, len(prompt_ids), per_call):
            chunk = prompt_ids[start:start + per_call]
            rows = [p for p in chunk for _ in range(copies)]  # request b's samples: rows b*copies .. +copies-1
            gens = None
            if not greedy:
                gens = [torch.Generator(device=self.device).manual_seed(
                    seed + start + b if seed is not None else int(torch.randint(2**62, (), generator=self._rng)))
                        for b in range(len(chunk))]
            new, lps = self._decode(rows, max_tokens, gens, copies, temperature, top_p)
            for b, p in enumerate(chunk):
                samples = [self._sample(p, new[b * copies + j], lps[b * copies + j]) for j in range(copies)]
                result.append(samples + [copy.deepcopy(samples[0]) for _ in range(n - copies)])
        return result

    @torch.inference_mode()
    def generate_turns(self, prompt_ids: list[list[int]], *, max_tokens: list[int], seeds: list[int],
                       stop: list[list[str]], temperature: float = 1.0, top_p: float = 1.0) -> list[Sample]:
        """One turn of each multi-turn trajectory (`rollout.vllm_engine.VllmEngine.generate_turns`' contract):
        request i continues `prompt_ids[i]` by at most `max_tokens[i]` tokens, sampled with a generator seeded
        `seeds[i]` (greedy at temperature 0), until EOS or one of `stop[i]` appears in its new text (the token that
        completes it is kept); `Sample.meta["stop"]` is that stop string (None: EOS or the length limit)."""
        if not len(prompt_ids) == len(max_tokens) == len(seeds) == len(stop):
            raise ValueError("generate_turns needs one max_tokens, seed and stop list per request")
        for i, (p, m) in enumerate(zip(prompt_ids, max_tokens, strict=True)):
            if not p or m < 1 or len(p) + m > self.max_model_len:
                raise ValueError(f"turn request {i}: {len(p)} tokens + max_tokens={m} exceeds the engine's "
                                 f"max_model_len={self.max_model_len} (or max_tokens < 1, or an empty prompt)")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature={temperature}, top_p={top_p}: need temperature >= 0 and 0 < top_p <= 1")
        tokenizer = self._stop_tokenizer() if any(stop) else None
        result: list[Sample] = []
        for start in range(0, len(prompt_ids), GENERATE_BATCH):
            chunk = range(start, min(len(prompt_ids), start + GENERATE_BATCH))
            rows = [prompt_ids[i] for i in chunk]
            gens = None
            if temperature > 0:
                gens = [torch.Generator(device=self.device).manual_seed(seeds[i]) for i in chunk]
            ends = _TurnEnds(tokenizer, [max_tokens[i] for i in chunk], [list(stop[i]) for i in chunk],
                             max(len(p) for p in rows), self.eos_ids)
            new, lps = self._decode(rows, max(max_tokens[i] for i in chunk), gens, 1, temperature, top_p,
                                    StoppingCriteriaList([ends]))
            for b, p in enumerate(rows):
                end, hit = ends.end_of(b, new[b].tolist())
                toks = new[b, :end].tolist()
                eos = bool(toks) and toks[-1] in self.eos_ids and hit is None
                result.append(Sample(prompt_ids=list(p), response_ids=toks, rollout_logprobs=lps[b, :end].tolist(),
                                     finish_reason="stop" if eos or hit is not None else "length",
                                     meta={"stop": hit}))
        return result

    def _decode(self, rows: list[list[int]], max_new: int, gens: list[torch.Generator] | None, copies: int,
                temperature: float, top_p: float,
                stopping: StoppingCriteriaList | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`model.generate` over left-padded `rows` (one generator per `copies` consecutive rows, or greedy
        without): the new tokens [rows, steps] and the raw (pre-temperature) log-prob of each."""
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new, min_new_tokens=0, num_beams=1,
                                  eos_token_id=self.eos_ids or None, pad_token_id=self.pad_id,
                                  output_logits=True, return_dict_in_generate=True)
        width = max(len(p) for p in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, p in enumerate(rows):  # left padding: every prompt ends where generation starts
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        processors = LogitsProcessorList()
        if gens is not None:
            processors.append(_SeededSampler(gens, copies, temperature, top_p))
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  generation_config=config, logits_processor=processors, stopping_criteria=stopping)
        new = out.sequences[:, width:].cpu()
        raw = torch.stack(out.logits, dim=1).float()  # [rows, steps, vocab]: before any processor
        lps = torch.log_softmax(raw, dim=-1).gather(-1, new[:, :, None].to(raw.device))[..., 0].cpu()
        return new, lps

    def _stop_tokenizer(self) -> Any:
        """The model folder's tokenizer: stop strings are matched on text, as vLLM matches them."""
        if self._tokenizer is None:
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            except Exception as e:  # noqa: BLE001 - the fix is the same whatever the loader raised
                raise ValueError(f"hf teacher {self.model_path}: multi-turn generation matches the environment's stop "
                                 f"strings on text and needs the model folder's tokenizer, which did not load "
                                 f"({type(e).__name__}: {e}); save the tokenizer next to the model") from None
        return self._tokenizer

    def _sample(self, prompt: list[int], tokens: torch.Tensor, logprobs: torch.Tensor) -> Sample:
        """One generated row, cut after its first end-of-sequence token (the rest is padding)."""
        toks = tokens.tolist()
        stop = next((t for t, tok in enumerate(toks) if tok in self.eos_ids), None)
        end = len(toks) if stop is None else stop + 1
        return Sample(prompt_ids=list(prompt), response_ids=toks[:end], rollout_logprobs=logprobs[:end].tolist(),
                      finish_reason="length" if stop is None else "stop")

    def score_tokens(self, sequences: list[list[int]], prompt_lens: list[int]) -> list[list[float]]:
        """The model's log-prob of each response token (the vLLM engines' diagnostic call)."""
        return [s.logprobs for s in self.score(sequences, prompt_lens, 0)]


class _TurnEnds:
    """Where each row's turn ends: its first EOS, the token that completes one of its stop strings in the new
    text (detokenized as vLLM does, special tokens skipped), or its own token limit. As a stopping criterion it
    stops each row there, so a batch runs as long as its longest turn only."""

    def __init__(self, tokenizer: Any, limits: list[int], stops: list[list[str]], width: int, eos_ids: list[int]) -> None:
        self.tokenizer, self.limits, self.stops, self.width, self.eos_ids = tokenizer, limits, stops, width, eos_ids

    def end_of(self, row: int, tokens: list[int]) -> tuple[int, str | None]:
        """(tokens kept, the stop string that ended the turn or None) of row `row`'s new tokens."""
        return turn_end(tokens, self.stops[row], self.tokenizer, self.eos_ids, self.limits[row])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        # Called after every token: only the newest can end a live row (a finished row's verdict is ignored).
        done = [len(toks) >= self.limits[b] or toks[-1] in self.eos_ids
                or stop_in(toks, self.stops[b], self.tokenizer) is not None
                for b, toks in enumerate(input_ids[:, self.width:].tolist())]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _SeededSampler:
    """A last logits processor that samples each row with its request's own `torch.Generator` (temperature,
    then top-p) and leaves only the chosen token finite, so greedy decoding emits exactly that token.

    Rows come `copies` per request (`num_return_sequences`); a request's generator draws for its rows in
    order at every step, so its samples depend on its seed alone, not on the batch around it."""

    def __init__(self, generators: list[torch.Generator], copies: int, temperature: float, top_p: float) -> None:
        self.generators, self.copies, self.temperature, self.top_p = generators, copies, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            # Keep the smallest head whose mass reaches top_p (the token that crosses it included).
            drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= self.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        chosen = torch.empty(scores.shape[0], dtype=torch.long)
        for row in range(scores.shape[0]):
            g = self.generators[row // self.copies]
            chosen[row] = torch.multinomial(probs[row], 1, generator=g).item()
        out = torch.full_like(scores, -math.inf)
        out.scatter_(-1, chosen.to(scores.device)[:, None], 0.0)
        return out


class HfTeacherGroup:
    """The `backend: hf` actor: one process holding one or more teachers by name.

    With one teacher, `ready`/`score`/`generate`/`generate_turns` are that teacher's; with several, a caller names
    the teacher (`score_as(name, ...)`), or uses the per-teacher handles `start_hf_group` returns, which do that for it."""

    def __init__(self, teachers: dict[str, dict[str, Any]], num_threads: int = 1) -> None:
        t0 = time.perf_counter()
        torch.set_num_threads(max(1, int(num_threads)))
        self.teachers = {name: HfTeacher(**kw) for name, kw in teachers.items()}
        self.startup_s = time.perf_counter() - t0

    def teacher(self, name: str) -> HfTeacher:
        try:
            return self.teachers[name]
        except KeyError:
            raise KeyError(f"teacher '{name}' is not in this hf actor group; it holds {sorted(self.teachers)}") from None

    def _only(self) -> HfTeacher:
        if len(self.teachers) != 1:
            raise RuntimeError(f"this hf actor holds {len(self.teachers)} teachers ({', '.join(self.teachers)}): "
                               "name one with ready_as/score_as/generate_as(name, ...), or use the per-teacher "
                               "handles start_hf_group returns")
        return next(iter(self.teachers.values()))

    def group_ready(self) -> dict[str, dict]:
        return {name: t.ready() for name, t in self.teachers.items()}

    def ready(self) -> dict:
        return self._only().ready()

    def score(self, sequences: list[list[int]], prompt_lens: list[int], top_k: int = 0) -> list[TeacherScores]:
        return self._only().score(sequences, prompt_lens, top_k)

    def generate(self, prompt_ids: list[list[int]], **kw: Any) -> list[list[Sample]]:
        return self._only().generate(prompt_ids, **kw)

    def generate_turns(self, prompt_ids: list[list[int]], **kw: Any) -> list[Sample]:
        return self._only().generate_turns(prompt_ids, **kw)

    def ready_as(self, name: str) -> dict:
        # The group's start-up (every model loaded) is what the caller waited for.
        return {**self.teacher(name).ready(), "startup_s": self.startup_s, "group": sorted(self.teachers)}

    def score_as(self, name: str, sequences: list[list[int]], prompt_lens: list[int],
                 top_k: int = 0) -> list[TeacherScores]:
        return self.teacher(name).score(sequences, prompt_lens, top_k)

    def generate_as(self, name: str, prompt_ids: list[list[int]], **kw: Any) -> list[list[Sample]]:
        return self.teacher(name).generate(prompt_ids, **kw)

    def generate_turns_as(self, name: str, prompt_ids: list[list[int]], **kw: Any) -> list[Sample]:
        return self.teacher(name).generate_turns(prompt_ids, **kw)


class _AsTeacher:
    """`handle.score` of a per-teacher handle: `.remote(...)` calls `score_as(name, ...)` on the group actor."""

    def __init__(self, handle: Any, method: str, name: str) -> None:
        self._handle, self._method, self._name = handle, method, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._handle, self._method).remote(self._name, *args, **kwargs)


def teacher_handle(actor: Any, name: str) -> Any:
    """A handle to the group actor that acts as teacher `name`'s own engine actor: `ready`, `score`,
    `generate` and `generate_turns` go to that teacher; everything else (`__ray_call__`, `ray.kill`, restarts) is the actor's.

    It is a real `ActorHandle` (a registered copy of `actor`), so Ray counts it as a reference to the actor.
    The binding lives in this process: pickled into another one, it becomes a plain group handle whose
    `score` refuses to guess the teacher (see `HfTeacherGroup._only`)."""
    h = copy.copy(actor)
    for method in ("ready", "score", "generate", "generate_turns"):
        setattr(h, method, _AsTeacher(h, f"{method}_as", name))
    h._mopd_teacher = name
    return h


def hf_env(threads: int) -> dict[str, str]:
    """Environment of an hf actor's process: its torch/OpenMP threads, nothing else spinning."""
    n = str(max(1, int(threads)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false"}


def start_hf_group(specs: dict[str, EngineSpec], replicas: int, scheduling: list[Any] | None = None) -> dict[str, list[Any]]:
    """One `HfTeacherGroup` actor per replica holding every teacher of `specs` (name -> spec; the bundle,
    restarts and threads come from the first spec, the dtype and context per teacher); returns name ->
    one handle per replica (not waited on). Threads: the bundle's CPUs (at least one)."""
    first = next(iter(specs.values()))
    threads = max(1, math.floor(first.num_cpus))
    device = "cuda" if first.num_gpus > 0 else None
    cls = ray.remote(HfTeacherGroup)
    opts = {"num_cpus": first.num_cpus, "num_gpus": first.num_gpus, "max_restarts": first.max_restarts,
            "max_task_retries": 0, "runtime_env": {"env_vars": hf_env(threads)}}
    kwargs = {name: {"model_path": s.model_path, "dtype": s.dtype, "max_model_len": s.max_model_len, "seed": s.seed,
                     "device": device} for name, s in specs.items()}
    actors = [cls.options(**opts, scheduling_strategy=at(scheduling, i)).remote(kwargs, num_threads=threads)
              for i in range(replicas)]
    if len(specs) == 1:
        return {next(iter(specs)): actors}
    return {name: [teacher_handle(a, name) for a in actors] for name in specs}


def start_hf_teachers(launches: list[Any], replicas: int, scheduling: list[Any] | None = None) -> dict[str, list[Any]]:
    """The `hf` backend's start function (teachers.backends): the launches share one actor per replica."""
    return start_hf_group({t.name: t.spec for t in launches}, replicas, scheduling)


def _first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)

"""Trainer loss memory vs response length and vocabulary, unchunked vs chunked (printed, never asserted).

    .venv/bin/python benchmarks/memory_scaling.py [--chunk N]

For each response length (512 / 2,048 / 8,192 tokens) and vocabulary (32k / 152k) it runs one forward +
backward of the per-position loss ``log-prob + entropy + reverse KL`` (teacher top-64, tail bucket: a
proper full-vocabulary KL) through :func:`mopd.chunked_logits.token_stats`, with a tiny hidden size (64)
so that only the ``[tokens, vocabulary]`` part costs anything -- the part chunking is about. Each
configuration runs in a fresh subprocess that reports its peak RSS (``ru_maxrss``) minus its own baseline
after imports, inputs and a warm-up, so one configuration's peak cannot hide the next one's. A
configuration whose estimated peak exceeds 60% of the available RAM is not run; the estimate is printed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

LENGTHS = (512, 2048, 8192)
VOCABS = (32_000, 152_000)
HIDDEN = 64
TOPK = 64
# fp32 [N, V]-sized tensors alive at once at the unchunked peak (log-probs, entropy and KL terms, the
# tail-bucket fill, their gradients): ~8.5 measured by tests/test_chunked_logits.py; 9 to be safe. A
# chunked run holds the same number of [C, V] tensors.
COPIES = 9
RAM_SHARE = 0.6


def _child(n: int, v: int, chunk: int) -> None:
    """One configuration, in its own process: prints a JSON line with the peak RSS above the baseline."""
    import torch

    from mopd.chunked_logits import token_stats

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(HIDDEN, v, bias=False)
    hidden = torch.randn(n, HIDDEN, generator=g).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g)
    # Unique ids per position without building an [N, V] teacher: a random offset plus a stride.
    ids = (torch.randint(0, v, (n, 1), generator=g) + torch.arange(TOPK) * 37) % v
    logps = torch.log_softmax(torch.randn(n, TOPK, generator=g), -1) + torch.log(torch.tensor(0.9))

    def step(rows: int) -> float:
        t0 = time.perf_counter()
        s = token_stats(hidden[:rows], head, targets[:rows], ids[:rows], logps[:rows], chunk_tokens=chunk)
        (s.logprobs_N.sum() + s.entropy_N.sum() + s.kl_N.sum()).backward()
        return time.perf_counter() - t0

    step(2)  # warm-up: lazily loaded kernels and libraries belong to the baseline
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    secs = step(n)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_bytes": (peak_kb - base_kb) * 1024, "seconds": secs}))


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _run(n: int, v: int, chunk: int) -> dict[str, float] | str:
    rows = n if chunk == 0 else min(chunk, n)
    estimate = rows * v * 4 * COPIES
    limit = RAM_SHARE * _available_bytes()
    if estimate > limit:
        return (f"not run: est. {estimate / 2**30:.1f} GiB (N*V*4 B x {COPIES} copies) "
                f"> {RAM_SHARE:.0%} of available {limit / RAM_SHARE / 2**30:.1f} GiB")
    cmd = [sys.executable, __file__, "--child", str(n), str(v), str(chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return f"failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gib(x: float) -> str:
    return f"{x / 2**30:8.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=1024, help="chunk_tokens of the chunked run (default 1024)")
    ap.add_argument("--child", type=int, nargs=3, metavar=("N", "V", "C"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return

    print(f"forward+backward of log-prob + entropy + reverse KL (teacher top-{TOPK}), hidden {HIDDEN}, fp32; "
          f"peak RSS above each fresh process's baseline; chunk = {args.chunk}")
    print(f"{'tokens':>7} {'vocab':>8} {'unchunked GiB':>14} {'s':>6} {'chunked GiB':>12} {'s':>6} "
          f"{'chunked/unchunked':>18}  note")
    per_token: dict[int, float] = {}  # unchunked bytes per token, per vocabulary (largest run)
    headline = ""
    for v in VOCABS:
        for n in LENGTHS:
            full = _run(n, v, 0)
            part = _run(n, v, args.chunk)
            note = ""
            if isinstance(full, dict):
                per_token[v] = full["peak_bytes"] / n
                full_bytes, full_s, full_txt = full["peak_bytes"], f"{full['seconds']:6.1f}", _gib(full["peak_bytes"])
            else:
                note = full
                full_bytes = per_token[v] * n if v in per_token else None  # extrapolated from a shorter run
                full_s, full_txt = "     -", "       -"
                if full_bytes is not None:
                    note += f"; extrapolated from the longest run: {full_bytes / 2**30:.1f} GiB"
            if isinstance(part, dict):
                part_txt, part_s = _gib(part["peak_bytes"]), f"{part['seconds']:6.1f}"
            else:
                part_txt, part_s, note = "       -", "     -", f"{note}; chunked {part}"
            ratio = (f"{part['peak_bytes'] / full_bytes:18.3f}" if isinstance(part, dict) and full_bytes
                     else f"{'-':>18}")
            extra = "" if isinstance(full, dict) else "*"
            print(f"{n:>7} {v:>8} {full_txt:>14} {full_s} {part_txt:>12} {part_s} {ratio}{extra}  {note}")
            if (n, v) == (LENGTHS[-1], VOCABS[-1]) and isinstance(part, dict) and full_bytes:
                kind = "measured" if isinstance(full, dict) else "extrapolated (* not run)"
                headline = (f"headline: {n} x {v}: chunked peak {part['peak_bytes'] / 2**30:.2f} GiB vs unchunked "
                            f"{full_bytes / 2**30:.2f} GiB ({kind}): ratio {part['peak_bytes'] / full_bytes:.3f} "
                            f"(1/{full_bytes / part['peak_bytes']:.1f})")
    if headline:
        print(headline)


if __name__ == "__main__":
    main()

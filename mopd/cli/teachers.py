"""`mopd teachers list|check CONFIG [overrides]`: which teacher serves which data, and whether every
teacher is fit to score before a run spends hours on it.

`check` exit codes: 0 every check ok, 1 a check failed (the report says which and how to fix it),
2 the config itself is unusable, or a model folder is (missing, no weights, a NaN weight, teacher_top_k
over the vocabulary: `teachers.preflight.check_model_folders`, run before any engine starts), printed by the CLI as
one line `mopd: error: ...`.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from mopd.cli.common import config_from_args as _cfg
from teachers.backends import get_teacher_backend


def cmd_list(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    print(teachers_table(cfg))
    print()
    print(domains_table(cfg))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Start (or connect to) every teacher, run the preflight, print the report."""
    from transformers import AutoTokenizer

    from mopd.world.prepare import prepare_world
    from teachers.preflight import check_model_folders, format_report, run_preflight

    cfg = _cfg(args)
    prepare_world(cfg)
    # Folders, weights (every tensor finite) and teacher_top_k vs the vocabulary, before any engine starts:
    # an unusable model is an input error (exit 2, one line), not a report of engines that failed to start.
    check_model_folders(cfg, log=print)
    student_tokenizer = AutoTokenizer.from_pretrained(cfg.student.path)
    rows = _rows_or_empty(cfg)
    with _teacher_handles(cfg) as teachers:
        checks = run_preflight(cfg, teachers, student_tokenizer, rows)
    print(format_report(checks))
    return 1 if any(not c.ok for c in checks) else 0


class _teacher_handles:
    """Server teachers as in-process clients (checked from where the command runs, no Ray needed);
    in-cluster teachers as the engine actors training would start, torn down on exit."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.ray_started = False
        self.placement = None
        self.actors: list[Any] = []
        self.clients: list[Any] = []

    def __enter__(self) -> dict[str, list[Any]]:
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> dict[str, list[Any]]:
        from teachers.registry import TeacherRegistry

        cfg = self.cfg
        local = TeacherRegistry()  # tokenizers are compared by the preflight, not refused here
        for name, t in cfg.teachers.items():
            if not get_teacher_backend(t.backend).remote:
                local.register(name, t.domains, t.path, backend=t.backend, replicas=t.replicas, dtype=t.dtype)
        started: dict[str, list[Any]] = {}
        if local.teachers:
            import ray

            from mopd.engine_group import start_teachers
            from mopd.placement import reserve
            from mopd.ray_cluster import init_ray

            self.ray_started = not ray.is_initialized()
            init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.host, log_to_driver=cfg.ray.log_to_driver)
            self.placement = reserve(cfg, trainer=False)
            started = start_teachers(cfg, local, self.placement)
            # A pooled teacher's handle is not an actor: its pool's engines are (each once).
            self.actors = list({id(x): x for reps in started.values() for a in reps
                                for x in (a.pool.engines if hasattr(a, "pool") else [a])}.values())
        out: dict[str, list[Any]] = {}
        for name, t in cfg.teachers.items():
            backend = get_teacher_backend(t.backend)
            if backend.remote:  # in this process: no cluster needed to check a server
                out[name] = backend.clients(name, t)
                self.clients += out[name]
            else:
                out[name] = started[name]
        return out

    def __exit__(self, *exc: Any) -> None:
        for c in self.clients:
            c.close()
        if not (self.actors or self.placement is not None or self.ray_started):
            return
        import ray

        for a in self.actors:
            ray.kill(a)
        if self.placement is not None:
            self.placement.remove()
        if self.ray_started:
            ray.shutdown()


def teachers_table(cfg: Any) -> str:
    rows = [("teacher", "domains", "backend", "path / urls", "replicas", "default")]
    for name, t in cfg.teachers.items():
        where = f"{', '.join(t.urls)} (tokenizer: {t.path})" if get_teacher_backend(t.backend).remote else t.path
        rows.append((name, ", ".join(t.domains), t.backend, where, str(t.replicas),
                     "yes" if cfg.data.default_teacher == name else ""))
    return _table(rows) if cfg.teachers else "no teachers configured (teachers.<name>: {path, domains, ...})"


def domains_table(cfg: Any) -> str:
    """The train data's domains, their row counts and who scores them; domains nobody serves are flagged."""
    from mopd.data import DataError, load_rows

    try:
        counts = Counter(r["domain"] for r in load_rows(cfg.data.train_files, cfg.data.dedupe))
    except (DataError, FileNotFoundError, OSError) as e:
        return f"train data: {e}"
    served = {d: n for n, t in cfg.teachers.items() for d in t.domains}
    rows = [("domain", "rows", "teacher")]
    unserved = []
    for d in sorted(set(counts) | set(served)):
        if d in served:
            who = served[d]
        elif cfg.data.default_teacher:
            who = f"{cfg.data.default_teacher} (data.default_teacher)"
        else:
            who = "NONE: no teacher serves it"
            unserved.append(d)
        rows.append((d, str(counts.get(d, 0)), who))
    text = f"train data ({', '.join(cfg.data.train_files)}): {sum(counts.values())} rows\n" + _table(rows)
    if unserved:
        text += (f"\nFLAG: {len(unserved)} domain(s) with no teacher: {', '.join(unserved)}; training refuses their "
                 "rows. Register a teacher for them (teachers.<name>.domains) or set data.default_teacher.")
    return text


def _rows_or_empty(cfg: Any) -> list[dict]:
    from mopd.data import DataError, load_rows

    try:
        return load_rows(cfg.data.train_files, cfg.data.dedupe)
    except (DataError, FileNotFoundError, OSError):
        return []  # probes fall back to fixed token ids


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths), *map(fmt, rows[1:])])


def add_parsers(subparsers: Any) -> None:
    """Register `teachers list` and `teachers check` on the CLI's subparsers."""
    teachers = subparsers.add_parser("teachers", help="registered teachers: list them, preflight-check them")
    sub = teachers.add_subparsers(dest="sub", required=True)
    for name, fn, help_ in [
        ("list", cmd_list, "teachers, their domains and backends, and the train data's domains per teacher"),
        ("check", cmd_check, "preflight every teacher (tokenizer, temperature 1 / normalised log-probs, "
                             "max_logprobs, determinism, reachability, latency); exit 1 if any check fails"),
    ]:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", nargs="?", default="configs/quickstart.yaml", help="experiment YAML")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algorithm.teacher_top_k=-1")
        sp.set_defaults(fn=fn)

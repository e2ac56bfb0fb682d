"""One logger for a run: `MultiplexLogger` fans each step record out to the JSONL file (the source of
truth), the optional TensorBoard / Weights & Biases / MLflow sinks, the progress bar and the dashboard
re-render, so the loop makes one `log(step, metrics)` call (tinker-cookbook's `ml_log` shape).

JSONL stays the source of truth (every value, NaN included, as written); these sinks are views for the
tools people already watch, so they only ever receive finite numbers -- a NaN or a string would crash
some backends and draw nothing in the others. Every sink writes under the run dir by default (W&B
offline, MLflow in a local SQLite store) so nothing needs a login or a network, and each keeps its run
identity in the run dir so that `mopd train --resume` continues the same run instead of starting a new one.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
import secrets
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from tqdm import tqdm

from mopd.atomic import write_text
from mopd.config import ConfigError, LoggingConfig, MopdConfig, to_dict, to_yaml
from mopd.jsonl import JsonlSink
from stability.dashboard import render_dashboard

# sink name -> (modules it imports, pip install command)
PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow-skinny sqlalchemy alembic"),
}


class Logger(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class MultiplexLogger:
    """Every logger of a run behind one `log` / `close`."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for lg in self.loggers:
            lg.log(step, metrics)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


class ProgressLogger:
    """Progress over the run's steps with teacher KL and per-domain verifier accuracy.

    On a terminal, a tqdm bar. Anywhere else (stderr piped to a file or a job log) a bar's redraws are noise:
    `make quickstart > log` wrote two full frames per step, 257 kB in 43 "lines". There it prints one plain
    line at the first training step, then at most one every `every_s` seconds, and a last one at close; the
    rate is over the steps since the previous line (what tqdm shows), the time since the first step.
    """

    def __init__(self, total: int, start: int, every_s: float = 30.0, stream: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.n, self.every_s, self.clock = total, start, every_s, clock
        self.postfix = ""
        self.first: float | None = None  # when the first training step was logged
        self.last: tuple[float, int] | None = None  # (time, step) of the last plain line
        tty = getattr(self.stream, "isatty", None)
        self.bar = (tqdm(total=total, initial=start, desc="mopd", dynamic_ncols=True, file=self.stream)
                    if tty is not None and tty() else None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if "mopd/teacher_kl" not in metrics and not any(k.startswith("reward/") for k in metrics):
            return  # an eval record: the progress follows training steps
        acc = " ".join(f"{k.split('/')[1]}={v:.2f}" for k, v in metrics.items()
                       if k.startswith("reward/") and isinstance(v, float) and v == v)
        self.postfix = f"kl={metrics.get('mopd/teacher_kl', float('nan')):.3f} {acc}".rstrip()
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix)
            self.bar.update(max(0, step - self.bar.n))
            return
        self.n = max(self.n, step)
        if self.last is None or self.clock() - self.last[0] >= self.every_s:
            self._line()

    def _line(self) -> None:
        now = self.clock()
        if self.first is None:
            self.first = now
        rate = ""
        if self.last is not None and now > self.last[0]:
            rate = f" {(self.n - self.last[1]) / (now - self.last[0]):.2f} steps/s"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(f"mopd step {self.n}/{self.total}{pct}{rate}, {now - self.first:.0f} s"
              + (f", {self.postfix}" if self.postfix else ""), file=self.stream, flush=True)
        self.last = (now, self.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.last is not None and self.last[1] != self.n:  # the last step's line, unless it is already out
            self._line()


class DashboardLogger:
    """Re-renders RUN_DIR/dashboard.html every `every` steps (and at close), after the JSONL line is written."""

    def __init__(self, run_dir: Path, every: int) -> None:
        self.run_dir, self.every = run_dir, every

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.every and step % self.every == 0 and "timing_s/step" in metrics:  # training records only
            self.render()

    def render(self) -> None:
        render_dashboard([self.run_dir], self.run_dir / "dashboard.html")

    def close(self) -> None:
        self.render()


def make_run_logger(cfg: MopdConfig, run_dir: Path, resume_step: int | None) -> MultiplexLogger:
    """JSONL first (the record of truth), then the configured sinks, the progress bar and the dashboard."""
    loggers: list[Logger] = make_sinks([str(getattr(n, "value", n)) for n in cfg.logging.sinks], run_dir,
                                       resume_step, cfg)
    if cfg.logging.progress_bar:
        loggers.append(ProgressLogger(cfg.trainer.steps, resume_step or 0, cfg.logging.progress_every_s))
    loggers.append(DashboardLogger(run_dir, cfg.logging.dashboard_every))
    return MultiplexLogger(loggers)


def make_sinks(names: list[str], run_dir: Path, resume_step: int | None, cfg: MopdConfig | None = None) -> list[Logger]:
    """One sink per name; `cfg` (the resolved MopdConfig) gives W&B/MLflow their settings and run params."""
    return [JsonlSink(run_dir / "metrics.jsonl", resume_step) if n == "jsonl" else make_logger(n, run_dir, cfg, resume_step)
            for n in names]


class MissingLoggerPackage(ConfigError):
    """A sink named in `logging.sinks` whose package is not installed; raised before any engine starts."""


def check_logger_packages(names: list[str], cfg: MopdConfig | None = None) -> None:
    """Fail before step 1 (before the world build and engine start-up) when a sink cannot be imported."""
    for name in names:
        if name == "jsonl":
            continue
        if name not in PACKAGES:
            raise ConfigError(f"logging.sinks: unknown sink {name!r}; allowed: jsonl | {' | '.join(PACKAGES)}")
        modules, pip = PACKAGES[name]
        if name == "mlflow" and cfg is not None and _mlflow_remote(cfg.logging.mlflow_tracking_uri):
            modules = ("mlflow",)  # a tracking server keeps the database; no local SQLite store needed
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingLoggerPackage(
                f"logging.sinks includes {name!r} but the Python package(s) {', '.join(missing)} are not installed: "
                f"run `.venv/bin/pip install -c constraints/cpu.txt {pip}` (or `pip install -e .[loggers]`), "
                f"or remove {name!r} from logging.sinks")


def make_logger(name: str, run_dir: str | Path, cfg: MopdConfig | None = None,
                resume_step: int | None = None) -> Any:
    """A sink with `log(step, metrics)` and `close()`; `resume_step` is the checkpoint step of a resumed run."""
    check_logger_packages([name], cfg)
    run_dir = Path(run_dir)
    cls = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MlflowLogger}[name]
    return cls(run_dir, cfg, resume_step)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite real numbers of a step record as floats; everything else is left out (JSONL keeps it)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, numbers.Real) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _logging_cfg(cfg: MopdConfig | None) -> LoggingConfig:
    return cfg.logging if cfg is not None else LoggingConfig()


def _run_name(cfg: MopdConfig | None, run_dir: Path) -> str:
    return cfg.experiment if cfg is not None else run_dir.name


def _new_run_id() -> str:
    """W&B-style id (8 lowercase letters/digits), chosen here so it can be stored before the run starts."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _mlflow_remote(uri: str | None) -> bool:
    return bool(uri) and not str(uri).startswith(("sqlite:", "file:", "/", "."))


class TensorBoardLogger:
    """Event files in RUN_DIR/tensorboard. A resumed run writes a purge marker at `resume_step + 1`, so
    TensorBoard's reader drops the events a crashed run wrote past its checkpoint (as the JSONL sink does)."""

    def __init__(self, run_dir: Path, cfg: MopdConfig | None, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run_dir / "tensorboard"
        if resume_step is None and log_dir.is_dir():  # a fresh run must not merge with an older one's curves
            for f in log_dir.glob("events.out.tfevents.*"):
                f.unlink()
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(str(log_dir), purge_step=purge)
        if cfg is not None and resume_step is None:
            self.writer.add_text("config", "```yaml\n" + to_yaml(cfg) + "```", 0)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for k, v in scalar_metrics(metrics).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a killed run keeps what it logged; a few KB per step

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """W&B, offline by default (`logging.wandb_mode`): RUN_DIR/wandb/offline-run-*, uploadable later with
    `wandb sync`. The run id is kept in RUN_DIR/wandb/run_id; a resumed run reopens it (`resume="allow"`).
    Online mode reads the key from WANDB_API_KEY as W&B itself does; nothing secret is written here."""

    def __init__(self, run_dir: Path, cfg: MopdConfig | None, resume_step: int | None) -> None:
        import wandb

        lc = _logging_cfg(cfg)
        wb_dir = run_dir / "wandb"
        wb_dir.mkdir(parents=True, exist_ok=True)
        id_file = wb_dir / "run_id"
        resuming = resume_step is not None and id_file.exists()
        run_id = id_file.read_text().strip() if resuming else _new_run_id()
        settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)
        self.run = wandb.init(
            project=lc.project, entity=lc.wandb_entity, name=_run_name(cfg, run_dir), id=run_id,
            resume="allow" if resuming else None, dir=str(run_dir), mode=lc.wandb_mode,
            config=to_dict(cfg) if cfg is not None else None, settings=settings, reinit="create_new")
        if resuming and cfg is not None:
            self.run.config.update(to_dict(cfg), allow_val_change=True)
        write_text(id_file, run_id + "\n")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        values = scalar_metrics(metrics)
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    """MLflow through `MlflowClient` (no global active run). `logging.mlflow_tracking_uri: null` keeps a
    SQLite store in RUN_DIR/mlflow (MLflow 3 refuses plain `./mlruns` folders); the run id is kept in
    RUN_DIR/mlflow/run_id and a resumed run logs into the same run. The resolved config goes in as params."""

    _BAD = re.compile(r"[^/\w.\- :]")  # MLflow's allowed key characters

    def __init__(self, run_dir: Path, cfg: MopdConfig | None, resume_step: int | None) -> None:
        from mlflow import MlflowClient

        lc = _logging_cfg(cfg)
        ml_dir = (run_dir / "mlflow").resolve()
        ml_dir.mkdir(parents=True, exist_ok=True)
        local = not lc.mlflow_tracking_uri
        self.uri = lc.mlflow_tracking_uri or f"sqlite:///{ml_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(lc.project)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            lc.project, artifact_location=(ml_dir / "artifacts").as_uri() if local else None)
        id_file = ml_dir / "run_id"
        params = self._params(cfg)
        if resume_step is not None and id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            old = self.client.get_run(self.run_id).data.params
            # Params are write-once in MLflow: add new keys, record changed values as tags.
            for k, v in params.items():
                if k in old and old[k] != v:
                    self.client.set_tag(self.run_id, f"resumed_at_{resume_step}.{k}", v)
            params = {k: v for k, v in params.items() if k not in old}
        else:
            self.run_id = self.client.create_run(exp_id, run_name=_run_name(cfg, run_dir)).info.run_id
            write_text(id_file, self.run_id + "\n")
        self._log_params(params)

    def _key(self, k: str) -> str:
        return self._BAD.sub("_", k)[:250]

    def _params(self, cfg: MopdConfig | None) -> dict[str, str]:
        if cfg is None:
            return {}
        flat: dict[str, str] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict) and node:
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                flat[self._key(prefix)] = str(node)[:6000]

        walk("", to_dict(cfg))
        return flat

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's per-batch param limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(self._key(k), v, ts, step) for k, v in scalar_metrics(metrics).items()]
        for i in range(0, len(items), 1000):  # MLflow's per-batch metric limit
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)

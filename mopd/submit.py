"""`mopd submit`: run `mopd train` on a running Ray cluster as a Ray job, through the cluster's
dashboard (job submission API), with this directory uploaded as the job's working directory.

The config is loaded and validated here first, so a typo fails before anything is uploaded. The job's
working directory is a temporary copy on the cluster: a relative `logging.run_dir`, and the relative
directories that registered config sections declare (`mopd.config.register_section(..., dirs=...)`: caches
kept outside the upload, such as the quickstart world's), are therefore made absolute (relative to the working
directory given here) so they are found and the run's outputs outlive the job; on a multi-node cluster point
them at shared storage.

The job's driver takes the run dir's lock itself (`mopd train`: one writer per run dir); where that run dir is
visible from here too (one machine, or shared storage), a run dir another process holds is refused here
already, before anything is uploaded. `--status` and `--stop` need no config: `--address` (or RAY_ADDRESS)
is enough.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray._private.thirdparty.pathspec import PathSpec
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient

from mopd.config import MopdConfig, section_dirs
from mopd.run_lock import holder_of

START_HEAD = ("start one from the project's virtualenv with `ray start --head --node-ip-address 127.0.0.1 "
              "--dashboard-host 127.0.0.1 --dashboard-port 8265` (README: Submitting to a cluster)")


class SubmitError(RuntimeError):
    """A submission problem the user can fix; the message says how."""


def dashboard_url(address: str | None, cfg: MopdConfig | None, environ: Mapping[str, str] = os.environ) -> str:
    """--address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS (as `ray job submit` reads them), else ray.address
    (`cfg` None: `--status` / `--stop` without a config)."""
    sources = [("--address", address), ("RAY_API_SERVER_ADDRESS", environ.get("RAY_API_SERVER_ADDRESS")),
               ("RAY_ADDRESS", environ.get("RAY_ADDRESS")), ("ray.address", cfg.ray.address if cfg else None)]
    found = [(src, v) for src, v in sources if v]
    if not found:
        where = " or set ray.address in the config" if cfg is not None else ""
        raise SubmitError("no Ray cluster to submit to: pass --address http://127.0.0.1:8265 or export "
                          f"RAY_ADDRESS=http://127.0.0.1:8265{where}; no cluster yet? {START_HEAD}")
    src, url = found[0]
    if "://" not in url:
        url = f"http://{url}"
    if not url.startswith(("http://", "https://")):
        raise SubmitError(f"{src}={url!r}: job submission goes through the cluster's dashboard, an http(s) URL "
                          "such as http://127.0.0.1:8265 (the head's --dashboard-port)")
    return url.rstrip("/")


def connect(url: str) -> Any:
    try:
        # Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the URL it is given; here the URL
        # was already chosen (--address first), so hide them while it resolves the address.
        saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
        try:
            return JobSubmissionClient(url)
        finally:
            os.environ.update(saved)
    except AuthenticationError:
        raise SubmitError(
            f"the Ray cluster at {url} requires its auth token: export RAY_AUTH_MODE=token in this shell (the token "
            "is read from RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)") from None
    except (ConnectionError, RuntimeError) as e:
        raise SubmitError(f"no Ray job server answers at {url} ({str(e).splitlines()[0][:200]}); check the URL is the "
                          f"head's dashboard port (8265 by default, not the GCS --port), or {START_HEAD}") from None


_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)


def runtime_env(cfg: MopdConfig, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The job's runtime env; secrets come from this shell by name (`env_vars_from_env`), never from the config."""
    env = cfg.ray.runtime_env
    wd = Path(env.working_dir)
    if not wd.is_dir():
        raise SubmitError(f"ray.runtime_env.working_dir={env.working_dir!r} is not a directory (relative paths are "
                          "relative to where `mopd submit` runs)")
    missing = [n for n in env.env_vars_from_env if n not in environ]
    if missing:
        raise SubmitError(f"ray.runtime_env.env_vars_from_env names {', '.join(missing)} but this shell does not set "
                          "it: export it before submitting, or remove it from the list")
    env_vars = {**env.env_vars, **{n: environ[n] for n in env.env_vars_from_env}}
    secret = [n for n in env.env_vars_from_env if _SECRET_NAME.search(n)]
    if secret:
        warnings.warn(f"ray.runtime_env.env_vars_from_env sends {', '.join(secret)} in the job's runtime env, which "
                      "Ray writes in clear to its session logs on the cluster (runtime_env_agent.log); on a shared "
                      "cluster export it on the nodes before `ray start` instead", stacklevel=2)
    return {"working_dir": str(wd.resolve()), "excludes": list(env.excludes), "env_vars": env_vars}


def entrypoint(config: str, overrides: list[str], cfg: MopdConfig, resume: bool = False,
               train_flags: list[str] | None = None) -> str:
    """`mopd train` for the job, with the config path relative to the working dir it is uploaded from.
    `train_flags`: more `mopd train` flags (`--resume-from step_N`, `--allow-teacher-change`)."""
    # The matcher Ray applies to `excludes` while packing the upload, so this check agrees with it.
    wd = Path(cfg.ray.runtime_env.working_dir).resolve()
    try:
        rel = Path(config).resolve().relative_to(wd)
    except ValueError:
        raise SubmitError(f"config {config} is outside ray.runtime_env.working_dir ({wd}), so the job cannot read "
                          "it: move it under that directory or set ray.runtime_env.working_dir") from None
    if PathSpec.from_lines("gitwildmatch", cfg.ray.runtime_env.excludes).match_file(str(rel)):
        raise SubmitError(f"config {rel} matches ray.runtime_env.excludes, so it is not uploaded: copy it to "
                          "configs/ (or another uploaded folder) and submit that copy")
    paths = {**section_dirs(cfg), "logging.run_dir": cfg.logging.run_dir}
    pinned = [f"{key}={wd / value}" for key, value in paths.items() if not Path(value).is_absolute()]
    return shlex.join(["mopd", "train", str(rel), *overrides, *pinned, *(["--resume"] if resume else []),
                       *(train_flags or [])])


def job_run_dir(cfg: MopdConfig) -> Path:
    """The run dir the job writes (a relative one is pinned under the working dir, as `entrypoint` does)."""
    p = Path(cfg.logging.run_dir)
    return p if p.is_absolute() else Path(cfg.ray.runtime_env.working_dir).resolve() / p


def check_run_dir_free(cfg: MopdConfig) -> None:
    """Refuse a submission whose run dir another process holds, where that dir is visible from here (the job's
    `mopd train` would be refused on the cluster anyway, after the upload)."""
    run_dir = job_run_dir(cfg)
    holder = holder_of(run_dir)
    if holder is not None:
        raise SubmitError(f"run dir {run_dir} is in use by {holder.describe()}: the job's `mopd train` would be "
                          "refused (one run writes a run dir at a time). Wait for that run or stop it, or set "
                          "another logging.run_dir")


def submit(cfg: MopdConfig, config: str, overrides: list[str], address: str | None = None, wait: bool = True,
           resume: bool = False, out: Callable[..., None] = print, train_flags: list[str] | None = None) -> int:
    """`cfg`: `config` + `overrides` already loaded (so validated) by the caller."""
    url = dashboard_url(address, cfg)
    env = runtime_env(cfg)
    command = entrypoint(config, overrides, cfg, resume, train_flags)
    check_run_dir_free(cfg)
    client = connect(url)
    job_id = client.submit_job(entrypoint=command, runtime_env=env, metadata={"mopd_experiment": cfg.experiment})
    names = sorted(env["env_vars"])
    out(f"submitted {job_id} to {url}\n  entrypoint: {command}\n  working_dir: {env['working_dir']}"
        + (f"\n  env_vars: {', '.join(names)}" if names else ""))
    if not wait:
        out(f"follow it with `mopd submit --status {job_id} --address {url}`; stop it with `mopd submit --stop "
            f"{job_id} --address {url}`")
        return 0
    return follow(client, job_id, out)


def follow(client: Any, job_id: str, out: Callable[..., None] = print) -> int:
    """Stream the job's log until it ends; 0 only if it SUCCEEDED."""
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out(lines, end="", flush=True)

    try:
        try:
            asyncio.run(tail())
        except Exception as e:  # noqa: BLE001 - the log stream is a convenience; the status decides
            out(f"(log stream interrupted: {e}; waiting for the job to end)")
        status = client.get_job_status(job_id)
        while not status.is_terminal():
            time.sleep(1.0)
            status = client.get_job_status(job_id)
    except KeyboardInterrupt:
        out(f"\nstopped following; {job_id} keeps running (`mopd submit --stop {job_id}` ends it)")
        return 130
    info = client.get_job_info(job_id)
    out(f"{job_id}: {status.value}" + (f" ({info.message})" if status != JobStatus.SUCCEEDED and info.message else ""))
    return 0 if status == JobStatus.SUCCEEDED else 1


def job_status(job_id: str, address: str | None, cfg: MopdConfig | None, out: Callable[..., None] = print) -> int:
    client = connect(dashboard_url(address, cfg))
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as e:
        raise SubmitError(f"{job_id}: {str(e).splitlines()[0]}") from None
    out(f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    return 0


def stop_job(job_id: str, address: str | None, cfg: MopdConfig | None, out: Callable[..., None] = print) -> int:
    client = connect(dashboard_url(address, cfg))
    try:
        stopped = client.stop_job(job_id)
    except RuntimeError as e:
        raise SubmitError(f"{job_id}: {str(e).splitlines()[0]}") from None
    out(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0

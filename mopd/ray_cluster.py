"""Connect to Ray: an existing cluster (address / RAY_ADDRESS, e.g. under `ray job submit`) or a
private local one bound to loopback, so nothing listens on a public interface by default."""

from __future__ import annotations

import os
from typing import Any

from mopd.config import ConfigError


def cluster_address(address: str | None) -> str | None:
    """The GCS address to connect to, or None for a private cluster.

    A dashboard URL (http://...: what `mopd submit` and `ray job submit` talk to) cannot be connected to;
    inside a submitted job Ray sets RAY_ADDRESS to the cluster's GCS address, which then wins over it.
    """
    env = os.environ.get("RAY_ADDRESS")
    candidates = [a for a in (address, env) if a]
    usable = [a for a in candidates if not a.startswith(("http://", "https://"))]
    if usable:
        return usable[0]
    if candidates:
        src = "ray.address" if address else "RAY_ADDRESS"
        raise ConfigError(
            f"{src}={candidates[0]!r} is a dashboard URL, which only job submission uses: run on that cluster "
            f"with `mopd submit CONFIG --address {candidates[0]}`, or give the cluster's GCS address "
            "(e.g. 127.0.0.1:6379 or auto) to connect from this process")
    return None


def init_ray(address: str | None = None, num_cpus: int = 2, host: str = "127.0.0.1",
             env_vars: dict[str, str] | None = None, log_to_driver: bool = True) -> Any:
    import ray

    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": env_vars or {}}
    address = cluster_address(address)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=host, runtime_env=runtime_env,
                 configure_logging=True, logging_level="WARNING", log_to_driver=log_to_driver)
    return ray

"""Connect to Ray: an existing cluster (address / RAY_ADDRESS, e.g. under `ray job submit`) or a
private local one bound to loopback, so nothing listens on a public interface by default."""

from __future__ import annotations

import os
from typing import Any


def init_ray(address: str | None = None, num_cpus: int = 2, host: str = "127.0.0.1",
             env_vars: dict[str, str] | None = None, log_to_driver: bool = True) -> Any:
    import ray

    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": env_vars or {}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=host, runtime_env=runtime_env,
                 configure_logging=True, logging_level="WARNING", log_to_driver=log_to_driver)
    return ray

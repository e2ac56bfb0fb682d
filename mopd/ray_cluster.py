"""Connect to Ray: an existing cluster (address / RAY_ADDRESS, e.g. under `ray job submit`) or a private
local one started by this process.

When `host` is a loopback address (the default 127.0.0.1) every process of the private cluster listens on
loopback only: GCS, raylet, the driver's and every worker's gRPC servers, the autoscaler monitor's and
the dashboard head's metrics servers (the head runs minimal: `include_dashboard=False`, no UI), the
dashboard agent (HTTP, gRPC, metrics-agent and Prometheus export ports) and the runtime-env agent bind
Ray's loopback address (`get_localhost_ip()`: 127.0.0.1); tests/test_loopback.py checks every socket. Ray
picks loopback for all of them from one switch: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes the node's
own address loopback (`ray._private.services.get_node_ip_address`), Ray hands that node address to every
process it launches, and each server then binds it instead of 0.0.0.0/:: (without it,
`_node_ip_address="127.0.0.1"` is silently turned back into the machine's external address). The
switch is read when `ray` is imported, so it is set both in the environment (for the processes Ray
spawns) and on the already imported constant. Any other `host` is taken as a deliberate choice to
expose the cluster on that address.

The private cluster's processes end with the driver: `ray.shutdown()` stops them all. On Linux the ones
the driver starts (GCS, raylet, monitor, dashboard head, log monitor) carry a parent-death signal (Ray's
kernel fate sharing), so a killed driver takes them along at once; workers follow their raylet, and the
dashboard and runtime-env agents exit about a minute later (they first try, for Ray's fixed 60 s, to
report the raylet's death to the dead GCS).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from mopd.config import ConfigError

# Read by ray._private.ray_constants at import; "0" keeps every process of a local cluster on loopback.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def force_loopback() -> None:
    """Make Ray treat this machine as a single loopback node (before or after `import ray`)."""
    os.environ[LOOPBACK_ENV] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(address: str | None = None, num_cpus: int = 2, host: str = "127.0.0.1",
             env_vars: dict[str, str] | None = None, log_to_driver: bool = True,
             temp_dir: str | None = None) -> Any:
    """Connect to `address` / RAY_ADDRESS, or start a private cluster on `host` (loopback by default).

    `temp_dir` (absolute, short: Ray puts Unix sockets under it) replaces /tmp/ray for a private cluster.
    """
    address = cluster_address(address)
    if not address and is_loopback(host):
        force_loopback()  # before `import ray` where possible; the constant is patched too
    import ray

    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": env_vars or {}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        kwargs: dict[str, Any] = {"_temp_dir": str(temp_dir)} if temp_dir else {}
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=host, runtime_env=runtime_env,
                 configure_logging=True, logging_level="WARNING", log_to_driver=log_to_driver, **kwargs)
    return ray

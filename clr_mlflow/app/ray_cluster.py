"""The sweep's Ray: its import, the settings it runs under, reaching or starting a cluster
and checking that a trial fits in it. Every failure is a one-line SweepError before the
sweep's parent run exists."""
from __future__ import annotations

import contextlib
import logging
import os
import socket

INSTALL = 'pip install "clr_mlflow[sweep]"'

# What a sweep needs of Ray and Tune, set for its duration where the caller has not set it
RAY_ENV = {"RAY_AIR_NEW_OUTPUT": "0",  # Tune's older reporter, which verbose=0 quiets
           "RAY_CHDIR_TO_TRIAL_DIR": "0",  # trials stay in our directory (and chdir there)
           "TUNE_DISABLE_SIGINT_HANDLER": "1",  # Ctrl-C stops the sweep (parent KILLED), not a stage
           "RAY_worker_niceness": "0"}  # a local Ray's trials (all our work) not niced to 15: starved when busy


class SweepError(RuntimeError):
    """The sweep cannot start: Ray is missing, its cluster unreachable or too small."""


def ray_modules():
    """(ray, ray.tune), or SweepError saying how to install them."""
    try:
        import ray
        from ray import tune
    except ImportError:
        raise SweepError(f"Expected Ray Tune for sweeps, but it is not installed: {INSTALL}") from None
    return ray, tune


@contextlib.contextmanager
def ray_settings():
    """RAY_ENV's variables the environment lacks, set until the block ends (a local Ray's
    processes inherit them at its start), then removed: the caller's environment is as before."""
    added = [name for name in RAY_ENV if name not in os.environ]
    os.environ.update({name: RAY_ENV[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def answers(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at a Ray `address` (`host:port`, `ray://host:port`), or None;
    None also for `auto` and addresses without a port, left to Ray. ray.init retries an
    address nothing listens at for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def check_resources(ray, cpus: float, gpus: float) -> None:
    have = ray.cluster_resources()
    for name, want in (("CPU", cpus), ("GPU", gpus)):
        if want > have.get(name, 0):
            flag = f"--{name.lower()}s-per-trial"
            raise SweepError(f"Expected {flag} to fit the Ray cluster, which has {have.get(name, 0):g} {name}s in all, "
                             f"but got {want:g}: no trial could ever start")


def start_ray(ray, address: str | None) -> bool:
    """Connect to `address`, or start a local Ray here; True when this call started it."""
    if ray.is_initialized():
        return False
    why = answers(address) if address else None
    if why:
        raise SweepError(f"Expected --ray-address {address} to be a running Ray cluster, but nothing answers there "
                         f"({why})")
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False)  # what a trial says is in its run
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SweepError(f"Expected to reach Ray at {address or 'a local cluster'}, but: {e}") from None
    return True

"""A sweep across processes: JAX's multi-process runtime, bounded waits and one-line errors.

    cluster = Cluster("10.0.0.1:12345", num_processes=2, process_id=1, timeout_s=30)
    join(cluster)                       # jax.distributed.initialize, before JAX's backend starts
    agree("manifest", fingerprint)      # every process has the same value, or CljaxError

After `join`, `jax.devices()` lists the devices of every process (a global mesh over them is the
sweep's `devices`); each process runs the share on its own devices. The waits on other processes
(`gather`, `agree`) go through the runtime's key-value store with a timeout: a missing or
disagreeing process is a CljaxError naming it, never a hang. No scheduler here: JAX's runtime
connects the processes (or detects the cluster: SLURM, Open MPI, TPU slices) and keeps them alive.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from cljax.errors import CljaxError

DEFAULT_TIMEOUT_S = 30.0
_PREFIX = "cljax"


class Cluster(NamedTuple):
  """How this process joins a multi-process run (JAX's names); None fields: detected by JAX."""

  coordinator: str | None  # HOST:PORT of process 0's coordination service
  num_processes: int | None
  process_id: int | None
  timeout_s: float = DEFAULT_TIMEOUT_S  # connecting, and waiting for the others at a handshake


def check(cluster: Cluster) -> None:
  """Raises CljaxError for settings no cluster can have (before anything is started)."""
  auto = cluster.coordinator is None
  given = (cluster.num_processes, cluster.process_id)
  if not auto and None in given:
    raise CljaxError(
      "--coordinator needs --num_processes and --process_id (or --distributed auto)."
    )
  if not auto and cluster.coordinator.rpartition(":")[0] == "":
    raise CljaxError(f"--coordinator {cluster.coordinator}: expected HOST:PORT.")
  if cluster.num_processes is not None and cluster.num_processes < 1:
    raise CljaxError(f"--num_processes must be >= 1, got {cluster.num_processes}.")
  n, i = given
  if i is not None and (i < 0 or (n is not None and i >= n)):
    raise CljaxError(
      f"--process_id {i} is out of range for --num_processes {n}: ids are 0..{(n or 1) - 1}."
    )
  if not 0 < cluster.timeout_s <= 3600:
    raise CljaxError(f"--distributed_timeout must be in (0, 3600] s, got {cluster.timeout_s}.")


def join(cluster: Cluster) -> None:
  """Joins JAX's multi-process runtime (`jax.distributed.initialize`); call before JAX computes.

  CPU collectives go through gloo. A process other than 0 first waits (at most timeout_s) for the
  coordinator's port to accept connections. JAX's own failure handling ends the process with a
  C++ log and stack trace; here a failure to connect or register within timeout_s is one
  CljaxError instead (JAX's log of it is kept in a file the message names).

  Raises:
    CljaxError: bad settings, no cluster detected, the coordinator unreachable, or the other
      processes not registering (a wrong --num_processes or --process_id) within timeout_s.
  """
  check(cluster)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # A process that dies is then not an error the service sends to every other process (which
  # ends them in C++); the others see it leave (`gather`) and stop with one line.
  jax.config.update("jax_enable_recoverability", True)
  timeout = max(1, round(cluster.timeout_s))
  if cluster.coordinator is not None and cluster.process_id != 0:
    _wait_for_port(cluster.coordinator, cluster.timeout_s)
  with _jax_log_to_file() as log, _failures_raise():
    try:
      jax.distributed.initialize(
        cluster.coordinator,
        cluster.num_processes,
        cluster.process_id,
        initialization_timeout=timeout,
        heartbeat_timeout_seconds=max(10, timeout),
        shutdown_timeout_seconds=timeout,
      )
    except Exception as e:  # JAX's ValueError / RuntimeError / XlaRuntimeError
      _abandon()
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      if cluster.coordinator is None:
        raise CljaxError(
          f"--distributed auto: JAX detected no cluster (SLURM, Open MPI, TPU) or could not "
          f"join it ({first}); give --coordinator, --num_processes and --process_id."
        ) from None
      raise CljaxError(
        f"process {cluster.process_id} could not join {cluster.num_processes} process(es) at "
        f"{cluster.coordinator} within {timeout} s (do all processes run, with the same "
        f"--num_processes?); JAX's log: {log}"
      ) from None
  atexit.register(leave)  # before JAX's own exit handler, which would shut down noisily


def leave() -> None:
  """Leaves the multi-process runtime (waiting at most its timeout for the others to leave too).

  JAX's complaints about a process that left early (killed) go to a log file, not the terminal.
  """
  if not is_joined():
    return
  with _jax_log_to_file():
    with contextlib.suppress(Exception):
      jax.distributed.shutdown()
    _abandon()


def is_joined() -> bool:
  """Whether this process is part of a multi-process run."""
  return jax.distributed.is_initialized()


def process() -> tuple[int, int]:
  """(this process's id, the number of processes) without starting JAX's backend; (0, 1) alone."""
  state = _state()
  if state.client is None:
    return 0, 1
  return int(state.process_id), int(state.num_processes)


def post(name: str, value: str) -> None:
  """Gives this process's `value` for `name` to the others without waiting (see `gather`).

  The first value posted for a name stays: a failure posted after it changes nothing.
  """
  pid, n = process()
  if n > 1:
    with contextlib.suppress(Exception):  # ALREADY_EXISTS
      _state().client.key_value_set(f"{_PREFIX}/{name}/{pid}", value)


def gather(name: str, value: str, timeout_s: float) -> list[str]:
  """Every process's `value` for `name`, in process order (each process calls it once per name).

  Raises:
    CljaxError: a process did not give its value within timeout_s (it failed or was killed).
  """
  _, n = process()
  if n == 1:
    return [value]
  post(name, value)
  client = _state().client
  out = []
  deadline = time.monotonic() + timeout_s
  for i in range(n):
    key = f"{_PREFIX}/{name}/{i}"
    while True:
      left = deadline - time.monotonic()
      try:
        ms = max(1, int(min(left, 1.0) * 1000))
        out.append(client.blocking_key_value_get(key, ms))
        break
      except Exception:  # JaxRuntimeError: DEADLINE_EXCEEDED, or the service is gone
        dead = i not in _live(client, n)
      with contextlib.suppress(Exception):  # a process that gave its value, then left
        out.append(client.key_value_try_get(key))
        break
      if dead or left <= 1.0:
        what = "stopped" if dead else f"did not reach '{name}' within {timeout_s:g} s"
        raise CljaxError(
          f"process {i} {what} (it failed, was killed, or --num_processes {n} is wrong); the "
          "records written so far are kept: run the same command again to resume."
        ) from None
  return out


def _live(client: Any, n: int) -> set[int]:
  """The processes the runtime still hears from (all of them if it cannot say)."""
  try:
    return set(client.get_live_nodes(list(range(n))))
  except Exception:
    return set(range(n))


def agree(name: str, value: str, timeout_s: float) -> None:
  """Checks that every process has the same `value` for `name`.

  A value starting with "error: " is a process's failure, reported as such by every process.

  Raises:
    CljaxError: a process's value differs from process 0's, or is missing within timeout_s.
  """
  values = gather(name, value, timeout_s)
  pid, _ = process()
  for i, v in enumerate(values):
    if v.startswith("error: ") and i != pid:
      raise CljaxError(f"process {i} failed before '{name}': {v[len('error: ') :]}")
  for i, v in enumerate(values):
    if v != values[0] and not v.startswith("error: "):
      raise CljaxError(
        f"the processes disagree on {name}: process {i} has {v}, process 0 {values[0]} (give "
        "every process the same command and data)."
      )


def replicate(tree: Any, devices: list[jax.Device]) -> Any:
  """`tree`'s arrays as global arrays, whole on each of `devices` (the same in every process).

  Each process places its own copy (no transfer); PRNG key arrays keep their type.
  """
  mesh = jax.sharding.Mesh(np.array(devices), ("runs",))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def put(a: Any) -> Any:
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      data = jax.device_put(np.asarray(jax.random.key_data(a)), whole)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
    return jax.device_put(np.asarray(a), whole)

  return jax.tree.map(put, tree)


def share(items: list[Any]) -> list[Any]:
  """This process's share of `items`: every n-th from its id (all of them in one process)."""
  pid, n = process()
  return items[pid::n]


def _state() -> Any:
  # The runtime's client (its key-value store and barrier take timeouts; multihost_utils' device
  # collectives would wait forever on a missing process), held by jax.distributed itself.
  from jax._src import distributed as jax_distributed

  return jax_distributed.global_state


def _wait_for_port(address: str, timeout_s: float) -> None:
  """Waits until HOST:PORT accepts a TCP connection; CljaxError after timeout_s."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  try:
    port_number = int(port)
  except ValueError:
    raise CljaxError(f"--coordinator {address}: expected HOST:PORT.") from None
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, port_number), timeout=min(2.0, timeout_s)):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise CljaxError(
          f"cannot reach the coordinator {address} within {timeout_s:g} s ({e.strerror or e}): "
          "is process 0 running, and HOST:PORT reachable from here?"
        ) from None
      time.sleep(0.2)


@contextlib.contextmanager
def _jax_log_to_file() -> Iterator[str]:
  """Sends this process's stderr (JAX's C++ log lines) to a file while joining; yields its path."""
  fd, path = tempfile.mkstemp(prefix="cljax-distributed-", suffix=".log")
  sys.stderr.flush()
  saved = os.dup(2)
  os.dup2(fd, 2)
  try:
    yield path
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(fd)
    if os.path.getsize(path) == 0:
      os.remove(path)


@contextlib.contextmanager
def _failures_raise() -> Iterator[None]:
  """While joining, JAX's client reports a failure as an exception, not by ending the process.

  jax.distributed.initialize makes its client with the default failure callback (a fatal C++ log);
  with any callback given, the error of a failed connection comes back to Python instead. This
  swaps in a view of JAX's extension module that adds one, for the duration of the call only.
  """
  from jax._src import distributed as jax_distributed

  real = jax_distributed._jax

  class _WithCallback:
    def __getattr__(self, name: str) -> Any:
      return getattr(real, name)

    @staticmethod
    def get_distributed_runtime_client(*args: Any, **kwargs: Any) -> Any:
      kwargs.setdefault("missed_heartbeat_callback", _on_failure)
      return real.get_distributed_runtime_client(*args, **kwargs)

  jax_distributed._jax = _WithCallback()
  try:
    yield
  finally:
    jax_distributed._jax = real


def _on_failure(status: Any) -> None:
  raise RuntimeError(str(status))


def _abandon() -> None:
  """Drops a half-joined runtime, so that JAX's exit handler has nothing left to shut down."""
  state = _state()
  for name in ("preemption_sync_manager", "client", "service"):
    part = getattr(state, name, None)
    if part is not None:
      with contextlib.suppress(Exception):
        part.shutdown()
      setattr(state, name, None)

"""JAX's persistent compilation cache for the command lines: its folder, on or off, and its hits.

`python -m cljax` and `cljax.sweep_cli` keep every compiled program in one folder, so a later
run with the same shapes (another seed, lr or memory_strength: traced values) loads its program
instead of compiling it. JAX's cache key already covers what changes the compiled code: the
program, the jaxlib version, the backend and its version, XLA_FLAGS, the compile options and the
devices (on a CPU their topology, which holds the machine's CPU features); so one folder serves
every configuration, version and machine kind. JAX never writes a program with host callbacks
(`jax.debug.callback`): a program meant to come from the cache has none.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

CACHE_DIR_ENV = "CLJAX_CACHE_DIR"
JAX_CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"  # JAX's own setting, honoured when ours is unset

# jax.monitoring events of `jax._src.compiler.compile_or_get_cached` (one per XLA compilation).
_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"  # looked up in the cache
_HIT = "/jax/compilation_cache/cache_hits"  # loaded from it
_WRITE = "/jax/compilation_cache/cache_misses"  # compiled and written to it


class CacheStatus(NamedTuple):
  """The cache of this process: on or off, its folder, and why a requested folder is not used."""

  enabled: bool
  dir: str | None  # the folder in use (None when off)
  problem: str | None = None  # one line: the requested folder cannot be used


class Compiles:
  """Counts of the XLA compilations seen by `count_compiles`: cache look-ups, hits and writes."""

  def __init__(self) -> None:
    self.requests = self.hits = self.writes = 0

  @property
  def from_cache(self) -> bool:
    """Whether every program compiled in the block was loaded from the cache (and one was)."""
    return self.requests > 0 and self.hits == self.requests


def default_dir(environ: Mapping[str, str] | None = None) -> str:
  """The cache folder: $CLJAX_CACHE_DIR, else $JAX_COMPILATION_CACHE_DIR, else the user's cache.

  The user's cache is $XDG_CACHE_HOME/cljax, else ~/.cache/cljax. Empty variables count as unset.
  """
  env = os.environ if environ is None else environ
  for name in (CACHE_DIR_ENV, JAX_CACHE_DIR_ENV):
    if env.get(name):
      return env[name]
  base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "cljax")


def folder_problem(path: str) -> str | None:
  """None if path is, or can be made, a folder this process can write to; else why not."""
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path) as f:  # unnamed where possible; removed on close
      f.write(b"0")
  except OSError as e:
    return e.strerror or str(e)
  return None


def enable(path: str | None) -> CacheStatus:
  """Turns JAX's persistent compilation cache on in folder `path` for every program, or off.

  On: every program is written, however quick its compile or small its executable. Off (`path`
  None, or a folder that cannot be created or written, said in `problem`): nothing is read or
  written, whatever JAX_COMPILATION_CACHE_DIR says. Call before compiling; it changes JAX's
  global configuration, as the command lines (the outermost layer) do.
  """
  problem = None
  if path is not None:
    path = os.path.abspath(os.path.expanduser(path))
    reason = folder_problem(path)
    if reason is not None:
      problem = f"cannot use the compile cache folder {path} ({reason}); running without it"
  on = path is not None and problem is None
  before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
  if on:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size limit
  jax.config.update("jax_enable_compilation_cache", on)
  if before != (on, jax.config.jax_compilation_cache_dir):
    jax_cache.reset_cache()  # JAX opens its cache once per process: open this one
  return CacheStatus(on, path if on else None, problem)


@contextlib.contextmanager
def count_compiles() -> Iterator[Compiles]:
  """Counts the XLA compilations inside the block (e.g. one `Lowered.compile()`)."""
  counts = Compiles()
  fields = {_REQUEST: "requests", _HIT: "hits", _WRITE: "writes"}

  def listen(event: str, **_: Any) -> None:
    if event in fields:
      setattr(counts, fields[event], getattr(counts, fields[event]) + 1)

  jax.monitoring.register_event_listener(listen)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_listener(listen)


def record(status: CacheStatus, compiles: Compiles | None = None) -> dict[str, Any]:
  """results.json's `compile_cache`: {enabled, dir, hit (the run's program came from it)}."""
  hit = compiles is not None and status.enabled and compiles.from_cache
  return {"enabled": status.enabled, "dir": status.dir, "hit": hit}

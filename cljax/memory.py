"""GEM's episodic memory: a fixed-shape ring buffer of n_memories examples per task.

`write_memory` is GEM's ring buffer per task; `write_reservoir` fills the same slots as one pool
by reservoir sampling over the whole stream (experience replay's other buffer).

Every shape is fixed from the start, (T, M, D), so a run compiles once whatever T is; the tasks
k < t already seen are a mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Memory(NamedTuple):
  """GEM's episodic memory: n_memories slots per task, filled as a ring buffer.

  x: (T, M, D) float32 examples (already transformed); y: (T, M) int32 labels;
  filled: (T, M) bool, slots written so far; cursor: () int32, the next slot (shared across
  tasks, as GEM's `mem_cnt`), or with `write_reservoir` the count of examples seen.
  """

  x: jax.Array
  y: jax.Array
  filled: jax.Array
  cursor: jax.Array


def empty_memory(n_tasks: int, n_memories: int, dim: int) -> Memory:
  """An empty memory of n_tasks x n_memories slots of dim-sized examples."""
  return Memory(
    x=jnp.zeros((n_tasks, n_memories, dim), jnp.float32),
    y=jnp.zeros((n_tasks, n_memories), jnp.int32),
    filled=jnp.zeros((n_tasks, n_memories), bool),
    cursor=jnp.zeros((), jnp.int32),
  )


def write_memory(memory: Memory, t: jax.Array, x: jax.Array, y: jax.Array) -> Memory:
  """Write a batch into task t's memory, as GEM's ring buffer.

  The first min(B, M - cursor) examples go to slots cursor, cursor + 1, ...; the cursor wraps to 0
  when it reaches M and is shared by all tasks (GEM's `mem_cnt`). x: (B, D), y: (B,).
  """
  M, B = memory.x.shape[1], x.shape[0]
  slots = memory.cursor + jnp.arange(B)
  fits = slots < M
  slots = jnp.where(fits, slots, M)  # out of range: dropped
  mx = memory.x.at[t, slots].set(x, mode="drop")
  my = memory.y.at[t, slots].set(y, mode="drop")
  mf = memory.filled.at[t, slots].set(True, mode="drop")
  cursor = memory.cursor + jnp.sum(fits)
  return Memory(mx, my, mf, jnp.where(cursor >= M, 0, cursor).astype(jnp.int32))


def write_reservoir(memory: Memory, x: jax.Array, y: jax.Array, key: jax.Array) -> Memory:
  """Write a batch by reservoir sampling (Vitter's algorithm R) into all T x M slots as one pool.

  The cursor counts the examples seen so far, n. The example seen n-th (from 0) takes slot n while
  n < N = T M, then a uniform j in [0, n]: slot j if j < N, else it is dropped. Every example seen
  is then in the pool with the same probability N / (n + 1), whatever its task. Within a batch a
  later example wins a slot two of them drew, as if written one by one. x: (B, D), y: (B,).
  """
  T, M, D = memory.x.shape
  N, B = T * M, x.shape[0]
  n = memory.cursor + jnp.arange(B)
  drawn = jax.random.randint(key, (B,), 0, n + 1)  # uniform in [0, n]
  slots = jnp.where(n < N, n, drawn)
  later_same = jnp.triu(slots[:, None] == slots[None, :], k=1).any(axis=1)
  slots = jnp.where((slots < N) & ~later_same, slots, N)  # N: dropped
  mx = memory.x.reshape(N, D).at[slots].set(x, mode="drop").reshape(T, M, D)
  my = memory.y.reshape(N).at[slots].set(y, mode="drop").reshape(T, M)
  mf = memory.filled.reshape(N).at[slots].set(True, mode="drop").reshape(T, M)
  return Memory(mx, my, mf, (memory.cursor + B).astype(jnp.int32))


def past_mask(memory: Memory, t: jax.Array) -> jax.Array:
  """(T,) bool: the past tasks k < t."""
  return jnp.arange(memory.x.shape[0]) < t


def past_weights(memory: Memory, t: jax.Array) -> jax.Array:
  """(T, M) weights of task k's mean memory loss: 1 / (its filled slots) on them, 0 for k >= t."""
  w = (memory.filled & past_mask(memory, t)[:, None]).astype(jnp.float32)
  return w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)


def first_tasks(memory: Memory, n: int) -> Memory:
  """The memory of tasks 0..n-1 only (the cursor unchanged)."""
  return Memory(memory.x[:n], memory.y[:n], memory.filled[:n], memory.cursor)

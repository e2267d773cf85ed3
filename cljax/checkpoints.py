"""A run's checkpoint after each finished task (Orbax): what `--resume` continues from.

    save(folder, done, payload, fingerprint)      # after task done - 1: {state, baseline, outputs}
    found = latest(folder)                         # (done, path) of the newest, or None
    payload = restore(path, like, fingerprint)     # refused if written under another fingerprint

A checkpoint is one Orbax checkpoint of the payload's leaves (Orbax writes it into a temporary
folder and renames it when complete: a killed write leaves no checkpoint) in
`{run folder}/checkpoints/task_{done}`, beside the fingerprint of the settings and the stream it
was written under. Only the newest is kept. The payload's structure comes from the caller (`like`:
the same program's state and outputs), so any pytree of arrays is saved as its flat leaves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from cljax.data import quiet_absl
from cljax.errors import CljaxError

CHECKPOINTS = "checkpoints"
FINGERPRINT = "fingerprint.json"
_NAME = re.compile(r"^task_(\d+)$")


def fingerprint(settings: Mapping[str, Any], arrays: Any) -> str:
  """sha256 of the settings (JSON, keys sorted) and of every array leaf's dtype, shape and bytes."""
  h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
  for leaf in jax.tree.leaves(arrays):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _leaves(payload: Any) -> dict[str, np.ndarray]:
  return {f"{i:05d}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(payload))}


def save(folder: str, done: int, payload: Any, fp: str) -> str:
  """Writes the checkpoint after `done` finished tasks; removes the older ones; returns its path."""
  import orbax.checkpoint as ocp  # imported when used: a second of import for every run else

  root = os.path.join(os.path.abspath(folder), CHECKPOINTS)
  path = os.path.join(root, f"task_{done}")
  if os.path.exists(path):
    shutil.rmtree(path)
  with quiet_absl(logging.WARNING), ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, "payload"), _leaves(payload))
    checkpointer.wait_until_finished()
  tmp = os.path.join(path, FINGERPRINT + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"fingerprint": fp, "tasks_done": done}, f)
  os.replace(tmp, os.path.join(path, FINGERPRINT))
  for name in os.listdir(root):
    match = _NAME.match(name)
    if match and int(match.group(1)) != done:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
  return path


def latest(folder: str) -> tuple[int, str] | None:
  """(tasks done, path) of the newest complete checkpoint in the run folder, or None."""
  root = os.path.join(folder, CHECKPOINTS)
  if not os.path.isdir(root):
    return None
  found = []
  for name in os.listdir(root):
    match = _NAME.match(name)
    if match and os.path.isfile(os.path.join(root, name, FINGERPRINT)):
      found.append((int(match.group(1)), os.path.join(root, name)))
  return max(found) if found else None


def restore(path: str, like: Any, fp: str) -> Any:
  """The payload saved at path, in the structure of `like` (arrays or ShapeDtypeStructs).

  Raises:
    CljaxError: the checkpoint was written under another fingerprint (other settings or another
      stream), or it does not hold like's leaves.
  """
  import orbax.checkpoint as ocp

  with open(os.path.join(path, FINGERPRINT)) as f:
    written = json.load(f)["fingerprint"]
  if written != fp:
    raise CljaxError(
      f"the checkpoint in {path} was written under other settings or another stream: run "
      "without --resume to start afresh, or with the settings it was written under"
    )
  leaves, treedef = jax.tree.flatten(like)
  target = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(a), a.dtype) for i, a in enumerate(leaves)}
  try:
    with quiet_absl(logging.WARNING), ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(os.path.join(path, "payload"), target)
  except Exception as e:  # a foreign or damaged folder: one line
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CljaxError(f"cannot read the checkpoint in {path}: {first}") from None
  return jax.tree.unflatten(treedef, [np.asarray(restored[k]) for k in sorted(restored)])


def remove(folder: str) -> None:
  """Removes the run folder's checkpoints (a completed run does not need them)."""
  shutil.rmtree(os.path.join(folder, CHECKPOINTS), ignore_errors=True)

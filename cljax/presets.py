"""Named command-line settings (`--preset NAME`): defaults that flags given explicitly override.

A preset maps flags (argparse dests) to values of the types the parser gives them, so
`--preset NAME` is the same as typing its flags; `apply` resolves one against the flags given.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, NamedTuple


class Preset(NamedTuple):
  """A named set of flag values: what it is (for --help), and dest -> value."""

  about: str
  settings: Mapping[str, Any]


PRESETS = {
  "seed": Preset(
    "the seed note's command line",
    # The seed note's command (the end of its section 3, seed.txt line 75: `python main.py --model
    # Agem --n_tasks 10 ...`): its settings that shape a run ("Agem" is cljax's agem; its data_file
    # names the dataset and protocol). Its other flags are unused or grouped, already the seed's.
    {
      "model": "agem",
      "n_tasks": 10,
      "lr": 0.01,
      "n_memories": 10,
      "memory_strength": 10.0,
      "n_layers": 2,
      "n_hiddens": 100,
      "batch_size": 1,
      "log_every": 100,
      "samples_per_task": 1000,
      "seed": 3,
      "replay_batch_size": 10,
      "dataset": "fashion_mnist",
      "protocol": "permutations",
    },
  ),
  "gem_paper_mnist": Preset(
    "the GEM paper's MNIST setting, for any --model, --dataset and --protocol",
    {
      "n_tasks": 20,
      "samples_per_task": 1000,
      "batch_size": 10,
      "lr": 0.1,
      "n_memories": 256,
      "memory_strength": 0.5,
      "n_layers": 2,
      "n_hiddens": 100,
    },
  ),
}


def describe(name: str) -> str:
  """A preset's settings as one phrase, e.g. "n_tasks 20, lr 0.1"."""
  return ", ".join(f"{dest} {value}" for dest, value in PRESETS[name].settings.items())


def apply(
  name: str, values: Mapping[str, Any], given: Collection[str]
) -> tuple[dict[str, Any], str | None]:
  """(the preset's settings to use, the note on the given flags that override it, or None).

  values: dest -> the value a given flag has (shown in the note); given: the dests given
  explicitly, in command-line order. A given flag wins over the preset; one whose value equals
  the preset's overrides nothing and is not mentioned.
  The note reads "preset NAME: --lr 0.05 given, overrides its 0.1; --n_tasks 2 given, ...".
  """
  settings = PRESETS[name].settings
  use = {dest: value for dest, value in settings.items() if dest not in given}
  overrides = [
    f"--{dest} {values[dest]} given, overrides its {settings[dest]}"
    for dest in given
    if dest in settings and values[dest] != settings[dest]
  ]
  return use, f"preset {name}: {'; '.join(overrides)}" if overrides else None

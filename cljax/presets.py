"""Named command-line settings (`--preset NAME`): defaults that flags given explicitly override.

A preset maps flags (argparse dests) to values of the types the parser gives them, so
`--preset NAME` is the same as typing its flags; where a paper fixes a method's own setting (the
A-GEM paper's reference sample of 256), the preset holds it for that --model only (`per_model`).
`apply` resolves one against the flags given.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, NamedTuple


class Preset(NamedTuple):
  """A named set of flag values.

  about: what it is (for --help); settings: dest -> value; per_model: a --model's name -> its own
  dest -> value, on top of settings.
  """

  about: str
  settings: Mapping[str, Any]
  per_model: Mapping[str, Mapping[str, Any]] = {}


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
    # The A-GEM paper samples 256 memory examples for its reference gradient; ER (Chaudhry et al.
    # 2019, "tiny episodic memories") replays as many memory examples as the batch holds.
    per_model={"agem": {"replay_batch_size": 256}, "er": {"replay_batch_size": 10}},
  ),
  "gem_paper_cifar": Preset(
    "the GEM paper's split CIFAR-100: 20 tasks x 5 classes on its reduced ResNet-18",
    # GEM's run_experiments.sh for cifar100.pt: batch 10, lr 0.1, 256 memories per task, margin
    # 0.5, all 2500 training examples of a task's 5 classes, one epoch.
    {
      "dataset": "cifar100",
      "protocol": "split",
      "classes_per_task": 5,
      "n_tasks": 20,
      "samples_per_task": 2500,
      "batch_size": 10,
      "lr": 0.1,
      "n_memories": 256,
      "memory_strength": 0.5,
      "network": "resnet18",
      "n_epochs": 1,
    },
    per_model={"agem": {"replay_batch_size": 256}, "er": {"replay_batch_size": 10}},
  ),
}


def describe(name: str) -> str:
  """A preset's settings as one phrase, e.g. "n_tasks 20, lr 0.1; agem: replay_batch_size 256"."""
  preset = PRESETS[name]
  phrase = ", ".join(f"{dest} {value}" for dest, value in preset.settings.items())
  for model, own in preset.per_model.items():
    phrase += f"; {model}: " + ", ".join(f"{dest} {value}" for dest, value in own.items())
  return phrase


def settings_for(name: str, model: str | None) -> dict[str, Any]:
  """The flag values preset name sets for a run of model (its own settings on top)."""
  preset = PRESETS[name]
  return {**preset.settings, **preset.per_model.get(model, {})}


def apply(
  name: str, values: Mapping[str, Any], given: Collection[str]
) -> tuple[dict[str, Any], str | None]:
  """(the preset's settings to use, the note on the given flags that override it, or None).

  values: dest -> the value a given flag has (shown in the note), and "model", the run's model
  (given or the preset's; its per-model settings join in); given: the dests given explicitly,
  in command-line order. A given flag wins over the preset; one whose value equals the preset's
  overrides nothing and is not mentioned.
  The note reads "preset NAME: --lr 0.05 given, overrides its 0.1; --n_tasks 2 given, ...".
  """
  model = values.get("model")
  if "model" not in given:
    model = PRESETS[name].settings.get("model", model)
  settings = settings_for(name, model)
  use = {dest: value for dest, value in settings.items() if dest not in given}
  overrides = [
    f"--{dest} {values[dest]} given, overrides its {settings[dest]}"
    for dest in given
    if dest in settings and values[dest] != settings[dest]
  ]
  return use, f"preset {name}: {'; '.join(overrides)}" if overrides else None

"""The command line's settings, shared by `python -m cljax` (one run) and `cljax.sweep_cli` (many).

The flags come from the engine's `Config` fields, the built-in rules' settings
(`cljax.rules.registry.SETTINGS`) and `GroupedConfig`'s fields (each default and help text stated
once, where it is declared), GEM's own flags keep their names, and the variant-dependent parts
(the rule's settings, the unused-flag report, run names) ask the rule registry. `--preset NAME`
(`cljax.presets`) supplies named defaults that flags given explicitly override. `parse_args`
checks a command line, `train_config` turns it into the engine's `Config`, `rule_for` into the
rule (`--model` with its settings, or `--rule`), `load_streams` loads the data; bad input is
a `CljaxError` with one line to show.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cljax import compile_cache, data, networks, presets, resnet, run_folder, tasks, train
from cljax.errors import CljaxError
from cljax.grouped.state import GroupedConfig, check_sizes
from cljax.networks import Network
from cljax.rules import registry
from cljax.rules.base import Rule

PROG = "cljax"
NETWORKS = ("mlp", "resnet18")
HELP_HINT = "see `python -m cljax --help`"

# The seed's run settings that are neither the engine's nor a rule's (its command line): the
# defaults. The rest of the seed's command is `train.Config`'s and `registry.SETTINGS`' defaults.
RUN_DEFAULTS = {
  "model": "agem_new",
  "dataset": "fashion_mnist",
  "protocol": "permutations",
  "n_tasks": 10,
  "save_path": "results/",
  "samples_per_task": 1000,
  "seed": 3,
}

# Flags of the seed's command that no variant uses yet: accepted, recorded, listed as unused.
SEED_ONLY_FLAGS = (
  "beta",
  "gamma",
  "memories",
  "batches_per_example",
  "forgetting_mode",
  "forgetting_task_ids",
  "forgetting_resee_size",
  "sign_attacked",
)

# The grouped variants' flags in the seed's order: GroupedConfig's fields by their flag names,
# and three of the seed's that map onto GroupedConfig.grouping (or nothing).
_GROUPED_CLI_ONLY = {
  "create_random_groups": (False, "random balanced groups instead of clusters of similar units"),
  "create_group_per_unit": (False, "one unit per group"),
  "divergence": ("von_Neumann", "the divergence between tasks' covariances (only von_Neumann)"),
}
_GROUPED_ORDER = (
  "num_groups",
  "cov_recompute_every",
  "create_random_groups",
  "create_group_per_unit",
  "divergence",
  "if_output_cov",
  "cov_first_task_buffer",
  "ewc_reverse",
  "gem_sub_mean",
  "gem_ignore_relatedness",
  "bias_once",
  "relatedness_margin",
  "cluster_iters",
  "cluster_max_size",
)


def _flag_name(field: dataclasses.Field) -> str:
  return field.metadata.get("flag", field.name)


_GROUPED_FIELDS = {_flag_name(f): f for f in dataclasses.fields(GroupedConfig) if f.metadata}
GROUPED_FLAGS = {  # flag -> default
  name: _GROUPED_FIELDS[name].default if name in _GROUPED_FIELDS else _GROUPED_CLI_ONLY[name][0]
  for name in _GROUPED_ORDER
}
_CONFIG_FIELDS = {_flag_name(f): f for f in dataclasses.fields(train.Config) if f.metadata}
# The built-in rules' settings that are flags (grouped's are GroupedConfig's fields).
_RULE_SETTINGS = {n: s for n, s in registry.SETTINGS.items() if n != "grouped"}


class _Parser(argparse.ArgumentParser):
  """An ArgumentParser that raises CljaxError instead of printing usage and exiting."""

  def error(self, message: str):
    """Reports a bad command line as a CljaxError (one line, exit status 2 in `main`)."""
    raise CljaxError(f"{message} ({HELP_HINT})")


class _Store(argparse.Action):
  """argparse's "store", also recording the flag in namespace.given (in command-line order)."""

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, values)
    if getattr(namespace, "given", None) is None:
      namespace.given = {}
    namespace.given.setdefault(self.dest, option_string)


class _Append(_Store):
  """argparse's "append" (a flag given several times), recorded in namespace.given too."""

  def __call__(self, parser, namespace, values, option_string=None):
    super().__call__(parser, namespace, [*(getattr(namespace, self.dest) or []), values])


class _StoreTrue(_Store):
  def __init__(self, option_strings, dest, default=False, help=None):
    super().__init__(option_strings, dest, nargs=0, const=True, default=default, help=help)

  def __call__(self, parser, namespace, values, option_string=None):
    super().__call__(parser, namespace, True, option_string)


def _variant(value: str) -> str:
  name = value.lower()  # the seed's "Agem" is the paper's A-GEM, "agem"
  if name not in registry.VARIANTS:
    raise argparse.ArgumentTypeError(
      f"unknown variant {value!r}: choose one of {', '.join(registry.VARIANTS)}"
    )
  return name


def _preset(value: str) -> str:
  if value not in presets.PRESETS:
    raise argparse.ArgumentTypeError(
      f"unknown preset {value!r}: choose one of {', '.join(presets.PRESETS)}"
    )
  return value


def _boolean(value: str) -> bool:
  """GEM's boolean flags come as the strings True / False; anything else is an error."""
  lowered = value.lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _yes_no(value: str) -> str:
  lowered = value.lower()
  if lowered in ("yes", "no", "true", "false"):
    return lowered
  raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


def _int_list(value: str) -> list[int]:
  try:
    return [int(v) for v in value.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected comma-separated integers (e.g. 0,5), got {value!r}"
    ) from None


def _add(group, flag: str, **kw) -> None:
  if kw.get("type") is _boolean:
    kw.setdefault("metavar", "{True,False}")
  group.add_argument(f"--{flag}", action=_Store, **kw)


def _add_field(group, field: dataclasses.Field) -> None:
  """The flag of a Config / GroupedConfig field: its default, help, choices and type."""
  meta, default = field.metadata, field.default
  kind = meta.get("type", type(default) if default is not None else str)
  kind = {bool: _boolean}.get(kind, kind)
  if "choices" in meta:
    _add(group, _flag_name(field), default=default, choices=meta["choices"], help=meta["help"])
  else:
    _add(group, _flag_name(field), type=kind, default=default, help=meta["help"])


def _add_setting(group, name: str, setting: registry.Setting) -> None:
  """The flag of a built-in rule's setting (`registry.SETTINGS`): its default, help, choices."""
  if setting.choices is not None:
    _add(group, name, default=setting.default, choices=setting.choices, help=setting.help)
  else:
    _add(group, name, type=type(setting.default), default=setting.default, help=setting.help)


def build_parser() -> argparse.ArgumentParser:
  """The command line: the seed's (GEM's) flags, verbatim, and cljax's own."""
  p = _Parser(
    prog=PROG,
    description="Continual learning with GEM / A-GEM in JAX: train one variant on a stream of "
    "permuted or rotated Fashion-MNIST / MNIST tasks, print GEM's result line, and write "
    "results.json and plots. The defaults are the seed's configuration.",
    allow_abbrev=False,
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  d = RUN_DEFAULTS
  seed = p.add_argument_group("GEM's flags (the seed's command line)")
  variants = "; ".join(f"{v.name}: {v.help}" for v in registry.VARIANTS.values())
  _add(
    seed,
    "model",
    type=_variant,
    default=d["model"],
    help="the rule (case-insensitive; the seed's Agem is agem, the A-GEM paper's rule): "
    + variants,
  )
  _add(seed, "n_tasks", type=int, default=d["n_tasks"], help="number of tasks")
  for field in _CONFIG_FIELDS.values():
    if field.metadata.get("gem"):
      _add_field(seed, field)
  for name, setting in _RULE_SETTINGS.items():
    if setting.gem:
      _add_setting(seed, name, setting)
  _add(
    seed,
    "data_path",
    default=None,
    help=f"folder of the 4 IDX files; when not given: ${data.DATA_PATH_ENV}, else "
    f"{data.DEFAULT_DATA_PATH} for fashion_mnist. With --data_file, a folder without them "
    "(GEM's folder of .pt files) falls back to the default",
  )
  _add(seed, "save_path", default=d["save_path"], help="root folder of the results folders")
  _add(
    seed,
    "samples_per_task",
    type=int,
    default=d["samples_per_task"],
    help="training examples per task",
  )
  _add(
    seed,
    "cuda",
    type=_yes_no,
    default="no",
    metavar="{yes,no}",
    help="accepted; JAX picks the device",
  )
  _add(seed, "seed", type=int, default=d["seed"], help="seeds the tasks, the data and the model")
  _add(
    seed,
    "data_file",
    default=None,
    help="GEM's prepared file, e.g. fashion_mnist_permutations_reduced.pt: not read; sets "
    "--dataset and --protocol when they are not given",
  )

  unused = p.add_argument_group("GEM's flags that no variant uses (accepted and recorded)")
  types = {"forgetting_mode": _boolean, "forgetting_task_ids": _int_list}
  floats = ("beta", "gamma", "sign_attacked")
  for name in SEED_ONLY_FLAGS:
    kind = types.get(name, float if name in floats else int)
    _add(unused, name, type=kind, default=None, help="unused")

  grouped = p.add_argument_group(
    f"Grouped GEM ({', '.join(registry.GROUPED_VARIANTS)}): the seed's flags, then cljax's"
  )
  for name in _GROUPED_ORDER:
    if name in _GROUPED_FIELDS:
      _add_field(grouped, _GROUPED_FIELDS[name])
    else:
      default, help = _GROUPED_CLI_ONLY[name]
      kind = _boolean if isinstance(default, bool) else str
      _add(grouped, name, type=kind, default=default, help=help)

  _add_own_flags(p.add_argument_group("cljax's flags"), d)
  return p


def _add_own_flags(own, d: Mapping[str, Any]) -> None:
  """Adds the flags of cljax's own (not the GEM code's): presets, data, network, rule, runs."""
  _add(
    own,
    "preset",
    type=_preset,
    default=None,
    metavar="{" + ",".join(presets.PRESETS) + "}",
    help="named defaults; a flag given explicitly wins (a note says so). "
    + "; ".join(
      f"{name}: {preset.about} ({presets.describe(name)})"
      for name, preset in presets.PRESETS.items()
    ),
  )
  _add(
    own,
    "dataset",
    default=d["dataset"],
    choices=data.DATASETS,
    help="the images (or from --data_file); cifar10 and cifar100 (colour, through TFDS) run "
    "--protocol split",
  )
  _add(
    own,
    "protocol",
    default=d["protocol"],
    choices=tasks.PROTOCOLS,
    help="the tasks: permuted or rotated images (one head), or split, the classes divided into "
    "tasks (task-incremental, one head per task); or from --data_file",
  )
  _add(
    own,
    "classes_per_task",
    type=int,
    default=None,
    help="--protocol split: classes per task (default: the dataset's usual, 2; cifar100: 5, "
    "GEM's 20 tasks); the task count defaults to classes / classes_per_task, and a larger "
    "--n_tasks is refused",
  )
  _add(
    own,
    "class_order",
    default="label",
    choices=tasks.CLASS_ORDERS,
    help="--protocol split: the tasks take the classes in label order, or in a random order "
    "drawn from --seed",
  )
  _add(
    own,
    "rule",
    default=None,
    metavar="MODULE:FACTORY",
    help="a rule written outside cljax instead of --model's: FACTORY() or FACTORY(config) in "
    "MODULE (importable from the working directory or PYTHONPATH) returns a cljax.rules.Rule; "
    "--model and its settings are then not read",
  )
  own.add_argument(
    "--hparam",
    action=_Append,
    default=None,
    metavar="NAME=VALUE",
    help="a --rule's own traced hyper-parameter (its Rule.hparams), e.g. scale=0.5; repeat for "
    "several; cljax.sweep_cli takes a comma-separated list, NAME=V1,V2, swept in one compile",
  )
  _add(
    own,
    "network",
    default=None,
    choices=NETWORKS,
    help="the network: GEM's MLP (--n_layers x --n_hiddens) or GEM's reduced ResNet-18 (32 x 32 "
    "x 3 images; BatchNorm); default: the dataset's usual, mlp for the MNISTs, resnet18 for CIFAR",
  )
  _add(
    own,
    "source",
    default="auto",
    choices=data.SOURCES,
    help="auto: IDX files when present, else TFDS when installed",
  )
  _add(own, "tfds_data_dir", default=None, help="TensorFlow Datasets data directory")
  _add(
    own,
    "test_samples",
    type=int,
    default=None,
    help="test examples per task; not given: the whole test split",
  )
  for field in _CONFIG_FIELDS.values():
    if not field.metadata.get("gem"):
      _add_field(own, field)
  for name, setting in _RULE_SETTINGS.items():
    if not setting.gem:
      _add_setting(own, name, setting)
  own.add_argument("--no_plots", action=_StoreTrue, help="do not write the PNG plots")
  own.add_argument(
    "--resume",
    action=_StoreTrue,
    help="continue the run in --save_path from its last finished task (a checkpoint is written "
    "after each task; one written under other settings or another stream is refused)",
  )
  own.add_argument(
    "--keep_checkpoints",
    action=_StoreTrue,
    help="keep the last task's checkpoint when the run completes (removed otherwise)",
  )
  own.add_argument(
    "--no_compile_cache",
    action=_StoreTrue,
    help="compile every program afresh, reading and writing no cache (without it: JAX's "
    f"persistent compilation cache in ${compile_cache.CACHE_DIR_ENV}, else "
    f"${compile_cache.JAX_CACHE_DIR_ENV}, else $XDG_CACHE_HOME/cljax or ~/.cache/cljax)",
  )


def data_file_settings(data_file: str) -> tuple[str, str]:
  """(dataset, protocol) named by a GEM data file, e.g. fashion_mnist_permutations_reduced.pt.

  Raises:
    CljaxError: the name does not start with a known dataset and protocol.
  """
  stem = os.path.basename(data_file)
  stem = stem[: -len(".pt")] if stem.endswith(".pt") else stem
  for dataset in sorted(data.DATASETS, key=len, reverse=True):  # fashion_mnist before mnist
    if stem.startswith(dataset + "_"):
      rest = stem[len(dataset) + 1 :]
      for protocol in tasks.PROTOCOLS:
        if rest == protocol or rest.startswith(protocol + "_"):
          return dataset, protocol
  raise CljaxError(
    f"cannot tell the dataset and protocol from --data_file {data_file!r}: expected "
    f"{{dataset}}_{{protocol}}[_...].pt with dataset in {', '.join(data.DATASETS)} and protocol "
    f"in {', '.join(tasks.PROTOCOLS)}; or pass --dataset and --protocol"
  )


# The registry's rule settings as flags (argparse dests): "grouped" is the grouped variants' flags.
_RULE_DESTS = {
  name: tuple(GROUPED_FLAGS) if name == "grouped" else (name,)
  for name in (registry.ENGINE_SETTINGS | set(registry.SETTINGS)) - set(registry.OVERRIDES)
}


def unused_dests(variant: str, agem_ref: str, projection: str | None = None) -> frozenset[str]:
  """The flags (argparse dests) that `variant` does not read: reported as unused when given."""
  reads = registry.settings_read(variant, agem_ref=agem_ref, projection=projection)
  unused = {d for name, dests in _RULE_DESTS.items() if name not in reads for d in dests}
  return frozenset(unused | set(SEED_ONLY_FLAGS))


def unused_flags(args: argparse.Namespace) -> list[str]:
  """The flags given on the command line that the rule does not use, each once, in order.

  With --rule: --model and the built-in rules' settings (its factory reads none of them).
  """
  if args.rule is None:
    unused = unused_dests(args.model, args.agem_ref, args.projection)
  else:
    settings = [d for n, dests in _RULE_DESTS.items() if n in registry.SETTINGS for d in dests]
    unused = {"model", *settings, *registry.OVERRIDES, *SEED_ONLY_FLAGS}
  return [f"--{dest}" for dest in args.given if dest in unused]


def parse_args(
  argv: Sequence[str] | None = None,
  parser: argparse.ArgumentParser | None = None,
  *,
  grid: Mapping[str, Sequence[float]] | None = None,
) -> tuple[argparse.Namespace, list[str]]:
  """Parses and checks a command line; returns the settings and the notes to show.

  The returned namespace has every flag's value and `given`, the flags given explicitly (a dict
  dest -> option string, in command-line order); a --preset's settings fill the flags not given
  (they are not in `given`).
  Notes (one line each): the given flags the variant does not use, the given flags that override
  the preset's values, and the dataset and protocol taken from --data_file.
  grid: the sweep's lists of swept flags (argv holds their first values), shown in the preset note.

  Raises:
    CljaxError: an unknown flag, a bad value, or an unreadable --data_file name.
    SystemExit: --help (after printing the help).
  """
  parser = build_parser() if parser is None else parser
  args, extra = parser.parse_known_args(argv, argparse.Namespace(given={}))
  if extra:
    flags = list(dict.fromkeys(e.split("=", 1)[0] for e in extra if e.startswith("-")))
    if flags:
      s = "s" if len(flags) > 1 else ""
      raise CljaxError(f"unknown flag{s}: {', '.join(flags)} ({HELP_HINT})")
    raise CljaxError(f"unexpected argument {extra[0]!r} (flags take the form --name value)")
  notes = []
  if args.preset is not None:
    shown = {
      **vars(args),
      **{k: ",".join(map(str, v)) for k, v in (grid or {}).items() if len(v) > 1},
    }
    use, override = presets.apply(args.preset, shown, args.given)
    for name, value in use.items():
      setattr(args, name, value)
    if override:
      notes.append(override)
  if args.data_file is not None:
    derived = {}
    if not {"dataset", "protocol"} <= args.given.keys():
      derived = dict(zip(("dataset", "protocol"), data_file_settings(args.data_file), strict=True))
      for name, value in derived.items():
        if name not in args.given:
          setattr(args, name, value)
    notes.append(
      f"--data_file {args.data_file} is not read: cljax builds the tasks from the "
      f"{args.dataset} images itself (dataset {args.dataset}, protocol {args.protocol}"
      + (", from the file name)" if derived else ")")
    )
  for flag in ("classes_per_task", "class_order"):
    if flag in args.given and args.protocol != "split":
      notes.append(f"--{flag} is read by --protocol split only, not {args.protocol}")
  if len(data.SPECS[args.dataset].image_shape) == 3 and args.protocol != "split":
    raise CljaxError(
      f"{args.dataset} has colour images: it runs --protocol split, not {args.protocol} (a "
      "pixel map would mix the channels)"
    )
  unused = unused_flags(args)
  if unused:
    what = registry.describe(args.model, args.agem_ref)[1].replace("(agem_ref", "(--agem_ref")
    what = what if args.rule is None else f"--rule {args.rule}"
    notes.insert(0, f"flags not used by {what}: {', '.join(unused)}")
  return args, notes


def grouped_config(args: argparse.Namespace) -> GroupedConfig:
  """The grouped variants' `GroupedConfig` from the flags (the default one for other variants)."""
  if args.model not in registry.GROUPED_VARIANTS:
    return GroupedConfig()
  if args.divergence != "von_Neumann":
    raise CljaxError(f"--divergence {args.divergence} is not implemented: only von_Neumann.")
  if args.create_random_groups and args.create_group_per_unit:
    raise CljaxError(
      "--create_random_groups True and --create_group_per_unit True contradict each other: "
      "choose one (neither: clusters of similar units)."
    )
  num_groups = args.num_groups
  if args.create_group_per_unit:
    grouping = "unit"
    if "num_groups" not in args.given:
      num_groups = args.n_hiddens
    elif num_groups != args.n_hiddens:
      raise CljaxError(
        f"--create_group_per_unit True makes n_hiddens ({args.n_hiddens}) groups: drop "
        f"--num_groups {num_groups} or set it to {args.n_hiddens}."
      )
  else:
    grouping = "random" if args.create_random_groups else "cluster"
  for name in ("cluster_iters", "cluster_max_size"):
    if grouping != "cluster" and name in args.given:
      raise CljaxError(f"--{name} applies to clustered groups, not to {grouping} groups.")
  if args.gem_ignore_relatedness:
    for name in ("if_output_cov", "ewc_reverse", "relatedness_margin"):
      if name in args.given and getattr(args, name) != GROUPED_FLAGS[name]:
        raise CljaxError(
          f"--gem_ignore_relatedness True sets every multiplier h to 1: --{name} "
          f"{getattr(args, name)} would have no effect; drop one of them."
        )
  fields = {f.name: getattr(args, flag) for flag, f in _GROUPED_FIELDS.items()}
  return GroupedConfig(**{**fields, "num_groups": num_groups, "grouping": grouping})


def name_parts(args: argparse.Namespace) -> dict[str, Any]:
  """The settings that name a run besides its variant (`run_folder.run_name`'s rule).

  The A-GEM rule overrides (None when not set) and, for the grouped variants, the grouped flags
  given with a value other than their default.
  """
  parts = {name: getattr(args, name) for name in registry.OVERRIDES}
  if args.model in registry.GROUPED_VARIANTS:
    for name, default in GROUPED_FLAGS.items():
      if name in args.given and getattr(args, name) != default:
        parts[name] = getattr(args, name)
  return parts


def train_config(args: argparse.Namespace, network: Network | None = None) -> train.Config:
  """The engine's `Config` from parsed arguments (raises CljaxError on bad values).

  memory_grads auto is resolved for the network (None: the MLP; `train.resolve_config`): what
  results.json records.
  """
  fields = {f.name: getattr(args, flag) for flag, f in _CONFIG_FIELDS.items()}
  return train.resolve_config(train.Config(**fields), network)


def rule_settings(args: argparse.Namespace) -> dict[str, Any]:
  """The --model's settings from the flags (`registry.make`'s): those it reads with them.

  The A-GEM family's overrides go in whenever given, so that a --model they do not apply to is
  refused. {} with --rule.
  """
  if args.rule is not None:
    return {}
  reads = registry.settings_read(args.model, agem_ref=args.agem_ref, projection=args.projection)
  return {
    name: grouped_config(args) if name == "grouped" else getattr(args, name)
    for name in registry.SETTINGS
    if name in reads or (name in registry.OVERRIDES and name in args.given)
  }


def rule_record(args: argparse.Namespace) -> dict[str, Any]:
  """What results.json and the fingerprints record of the rule's settings (JSON values)."""
  return {
    name: dataclasses.asdict(value) if isinstance(value, GroupedConfig) else value
    for name, value in rule_settings(args).items()
  }


def rule_for(
  args: argparse.Namespace, config: train.Config, network: Network | None = None
) -> Rule:
  """The run's Rule: --model's with its settings (`registry.make`), or the --rule factory's.

  config: the run's (memory_grads resolved); network: the run's (None: the MLP). What the
  engine would refuse (`train.check_rule`) is said here, before the data loads, with the rule's
  name.

  Raises:
    CljaxError: a bad --model setting, a network the rule cannot train; with --rule: a value not
      MODULE:FACTORY, a module that cannot be imported, a factory that is missing, not
      callable, fails, or does not return a Rule. One line each.
  """
  if args.rule is None:
    settings = rule_settings(args)
    rule = registry.make(args.model, **settings)
    split = args.protocol == "split"
    train.check_rule(config, rule, network, name=args.model, split=split)
    if "grouped" in settings:  # what its init refuses when traced, said before the run
      check_sizes(settings["grouped"], config.n_hiddens)
    return rule
  module_name, sep, name = args.rule.partition(":")
  if not sep or not module_name or not name:
    raise CljaxError(f"--rule {args.rule!r}: give MODULE:FACTORY, e.g. my_rules:loss_weighted")
  if os.getcwd() not in sys.path and "" not in sys.path:
    sys.path.insert(0, os.getcwd())  # as `python -m` does: the working directory's modules
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # ImportError, or the module's own error: one line
    raise CljaxError(
      f"--rule {args.rule}: cannot import {module_name} ({type(e).__name__}: {_first_line(e)}); "
      "it must be importable from the working directory or PYTHONPATH"
    ) from None
  factory = getattr(module, name, None)
  if not callable(factory):
    raise CljaxError(f"--rule {args.rule}: {module_name} has no callable {name}")
  try:
    takes_config = any(
      p.default is inspect.Parameter.empty
      and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
      for p in inspect.signature(factory).parameters.values()
    )
    rule = factory(config) if takes_config else factory()
  except Exception as e:
    raise CljaxError(
      f"--rule {args.rule}: the factory failed ({type(e).__name__}: {_first_line(e)})"
    ) from None
  if not isinstance(rule, Rule):
    raise CljaxError(
      f"--rule {args.rule}: the factory returned a {type(rule).__name__}, not a cljax.rules.Rule"
    )
  split = args.protocol == "split"
  train.check_rule(config, rule, network, name=f"--rule {args.rule}", split=split)
  return rule


def parse_hparam(item: str, *, listed: bool = False) -> tuple[str, list[float]]:
  """One --hparam NAME=VALUE as (name, [value]); listed (a sweep's NAME=V1,V2,...): every value.

  Raises:
    CljaxError: a malformed item or a value that is not a number (one line).
  """
  name, sep, text = item.partition("=")
  texts = [v for v in text.split(",") if v.strip()] if listed else [text]
  if not sep or not name.isidentifier() or not texts:
    form = (
      "NAME=VALUE or NAME=V1,V2,..., e.g. scale=0.5,1" if listed else "NAME=VALUE, e.g. scale=0.5"
    )
    raise CljaxError(f"--hparam {item!r}: give {form}")
  values = []
  for v in texts:
    try:
      values.append(float(v))
    except ValueError:
      raise CljaxError(f"--hparam {item}: {v!r} is not a number") from None
  return name, values


def hparam_values(args: argparse.Namespace) -> dict[str, float]:
  """The --hparam NAME=VALUE flags as {name: value} (CljaxError: a malformed one, one line)."""
  out = {}
  for item in getattr(args, "hparam", None) or []:
    name, (value,) = parse_hparam(item)
    out[name] = value
  return out


def run_hparams(
  config: train.Config,
  rule: Rule,
  values: Mapping[str, float],
  lr: float | None = None,
  memory_strength: float | None = None,
) -> train.HParams:
  """A run's traced hyper-parameters (`train.HParams`).

  lr and memory_strength (default: the config's) and the rule's own (`Rule.hparams`: its
  defaults, overridden by values).

  Raises:
    CljaxError: a value for a name the rule does not declare (one line).
  """
  declared = dict(rule.hparams or {})
  unknown = sorted(set(values) - set(declared))
  if unknown:
    has = f"it declares {', '.join(sorted(declared))}" if declared else "it declares none"
    raise CljaxError(
      f"--hparam {unknown[0]}: the rule has no such hyper-parameter ({has}; --hparam sets a "
      "--rule's own, Rule.hparams)"
    )
  # numpy, not `train.default_hparams`' jax arrays: a sweep calls this before JAX's backend starts
  f32 = np.float32
  extra = {name: np.asarray(values.get(name, v), f32) for name, v in declared.items()} or None
  return train.HParams(
    np.asarray(config.lr if lr is None else lr, f32),
    np.asarray(config.memory_strength if memory_strength is None else memory_strength, f32),
    extra,
  )


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else ""


def run_name(args: argparse.Namespace, seed: int) -> str:
  """The results folder's name (`run_folder.run_name`; with --rule, "rule-MODULE.FACTORY_...")."""
  if args.rule is not None:
    return f"rule-{args.rule.replace(':', '.')}_{args.dataset}_{args.protocol}_seed{seed}"
  return run_folder.run_name(
    args.model, args.dataset, args.protocol, seed, agem_ref=args.agem_ref, rule=name_parts(args)
  )


def network_for(args: argparse.Namespace) -> Network | None:
  """The run's network from --network (None: the config's MLP); args.network set to its name.

  Raises:
    CljaxError: resnet18 on images other than 32 x 32 x 3.
  """
  spec = data.SPECS[args.dataset]
  args.network = args.network or spec.network
  if args.network == "mlp":
    return None
  if spec.channels_last != resnet.IMAGE_SHAPE:
    shape = " x ".join(map(str, spec.channels_last))
    raise CljaxError(
      f"resnet18 reads 32 x 32 x 3 colour images (cifar10, cifar100); {args.dataset}'s are "
      f"{shape}: use --network mlp"
    )
  model = resnet.ResNet18(n_classes=spec.n_classes)  # GEM's 20 base filters
  return networks.from_module(model, input_shape=spec.channels_last, n_classes=spec.n_classes)


def has_idx_files(directory: str) -> bool:
  """Whether directory holds any of the four IDX files (gzipped or plain)."""
  return any(
    os.path.isfile(os.path.join(directory, stem + ext))
    for stem in data.IDX_FILES.values()
    for ext in ("", ".gz")
  )


def data_path_for(args: argparse.Namespace) -> tuple[str | None, str | None]:
  """(IDX folder to read or None for the default, note or None) for the settings.

  GEM's --data_path is a folder of .pt files: with --data_file, a folder without IDX files falls
  back to the default data location, with a note.
  """
  path = args.data_path
  if path and args.data_file is not None and args.source != "tfds" and not has_idx_files(path):
    note = (
      f"--data_path {path} holds no IDX files (GEM's folder of .pt files); reading "
      f"{args.dataset} from the default location instead"
    )
    return None, note
  return path, None


def load_streams(args: argparse.Namespace, data_path: str | None, seeds: Sequence[int]):
  """(streams, source, IDX folder or None, warnings): one task stream per seed."""
  source = data.resolve_source(args.dataset, data_path=data_path, source=args.source)
  directory = data.resolve_data_path(args.dataset, data_path) if source == "idx" else None
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", UserWarning)
    dataset = data.load_dataset(
      args.dataset, data_path=data_path, source=source, tfds_data_dir=args.tfds_data_dir
    )
    # Under split the task count is the dataset's (classes / classes_per_task) unless typed.
    typed = args.protocol != "split" or "n_tasks" in args.given
    streams = [
      tasks.make_stream(
        dataset,
        protocol=args.protocol,
        n_tasks=args.n_tasks if typed else None,
        samples_per_task=args.samples_per_task,
        test_samples=args.test_samples,
        seed=seed,
        classes_per_task=args.classes_per_task,
        class_order=args.class_order,
      )
      for seed in seeds
    ]
  args.n_tasks = int(streams[0].train_idx.shape[0])  # the settings record the tasks run
  messages = []
  for w in caught:
    if issubclass(w.category, UserWarning):
      if str(w.message) not in messages:
        messages.append(str(w.message))
    else:
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  return streams, source, directory, messages


def load_stream(args: argparse.Namespace, data_path: str | None):
  """(stream, source, IDX folder or None, warnings): the task stream the settings describe."""
  streams, source, directory, messages = load_streams(args, data_path, [args.seed])
  return streams[0], source, directory, messages


def divergence_message(
  t: int, n_tasks: int, variant: str, folder: str, projection: str | None = None
) -> str:
  """The one line that says a run diverged after task t, what was kept, and what to lower."""
  if t + 2 == n_tasks:
    rest = f"task {t + 1} was not trained; "
  elif t + 1 < n_tasks:
    rest = f"tasks {t + 1}-{n_tasks - 1} were not trained; "
  else:
    rest = ""
  knobs = "--lr or --memory_strength" if registry.uses_qp(variant, projection) else "--lr"
  return (
    f"parameters became non-finite while training task {t}; {rest}results so far are kept in "
    f"{folder}; try a lower {knobs}"
  )


def use_compile_cache(args: argparse.Namespace) -> compile_cache.CacheStatus:
  """Turns on JAX's persistent compilation cache for the run, unless --no_compile_cache.

  The folder is `compile_cache.default_dir()`; one that cannot be used is a warning (one line),
  and the run goes on without the cache.
  """
  status = compile_cache.enable(None if args.no_compile_cache else compile_cache.default_dir())
  if status.problem:
    warning(f"{status.problem} (set ${compile_cache.CACHE_DIR_ENV}, or pass --no_compile_cache)")
  return status


def note(message: str) -> None:
  """Prints "cljax: note: message" on stderr."""
  print(f"{PROG}: note: {message}", file=sys.stderr)


def warning(message: str) -> None:
  """Prints "cljax: warning: message" on stderr."""
  print(f"{PROG}: warning: {message}", file=sys.stderr)


def error(message: Any) -> None:
  """Prints "cljax: error: message" on stderr (one line)."""
  print(f"{PROG}: error: {message}", file=sys.stderr)

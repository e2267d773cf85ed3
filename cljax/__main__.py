"""Command line: `python -m cljax` trains one GEM / A-GEM variant and writes its results folder."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from cljax import data, models, results, tasks, train
from cljax.errors import CljaxError
from cljax.grouped_state import GroupedConfig
from cljax.rules import registry

_PROG = "cljax"
_HELP_HINT = "see `python -m cljax --help`"

# The seed's configuration (its command line): the defaults, so that `python -m cljax` runs it.
SEED_DEFAULTS = {
  "model": "agem_new",
  "dataset": "fashion_mnist",
  "protocol": "permutations",
  "n_tasks": 10,
  "lr": 0.01,
  "n_memories": 10,
  "memory_strength": 10.0,
  "n_layers": 2,
  "n_hiddens": 100,
  "save_path": "results/",
  "batch_size": 1,
  "log_every": 100,
  "samples_per_task": 1000,
  "seed": 3,
  "replay_batch_size": 10,
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

# The grouped variants' flags: the seed's (its command line) and cljax's, with their defaults.
GROUPED_FLAGS = {
  "num_groups": 20,
  "cov_recompute_every": 20,
  "create_random_groups": False,
  "create_group_per_unit": False,
  "divergence": "von_Neumann",
  "if_output_cov": False,
  "cov_first_task_buffer": 100,
  "ewc_reverse": False,
  "gem_sub_mean": True,
  "gem_ignore_relatedness": False,
  "bias_once": False,
  "relatedness_margin": 0.0,
  "cluster_iters": 20,
  "cluster_max_size": None,
}

_RULE_FLAGS = ("reference_row", "trigger", "projection")  # train.Config's A-GEM rule overrides


class _Parser(argparse.ArgumentParser):
  """An ArgumentParser that raises CljaxError instead of printing usage and exiting."""

  def error(self, message: str):
    """Reports a bad command line as a CljaxError (one line, exit status 2 in `main`)."""
    raise CljaxError(f"{message} ({_HELP_HINT})")


class _Store(argparse.Action):
  """argparse's "store", also recording the flag in namespace.given (in command-line order)."""

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, values)
    if getattr(namespace, "given", None) is None:
      namespace.given = {}
    namespace.given.setdefault(self.dest, option_string)


class _StoreTrue(_Store):
  def __init__(self, option_strings, dest, default=False, help=None):
    super().__init__(option_strings, dest, nargs=0, const=True, default=default, help=help)

  def __call__(self, parser, namespace, values, option_string=None):
    super().__call__(parser, namespace, True, option_string)


def _variant(value: str) -> str:
  name = value.lower()  # the seed's "Agem" is the paper's A-GEM, "agem"
  if name not in train.VARIANTS:
    raise argparse.ArgumentTypeError(
      f"unknown variant {value!r}: choose one of {', '.join(train.VARIANTS)}"
    )
  return name


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


def build_parser() -> argparse.ArgumentParser:
  """The command line: the seed's (GEM's) flags, verbatim, and cljax's own."""
  p = _Parser(
    prog=_PROG,
    description="Continual learning with GEM / A-GEM in JAX: train one variant on a stream of "
    "permuted or rotated Fashion-MNIST / MNIST tasks, print GEM's result line, and write "
    "results.json and plots. The defaults are the seed's configuration.",
    allow_abbrev=False,
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  d = SEED_DEFAULTS
  seed = p.add_argument_group("GEM's flags (the seed's command line)")

  def add(group, flag, **kw):
    group.add_argument(flag, action=_Store, **kw)

  add(
    seed,
    "--model",
    type=_variant,
    default=d["model"],
    help="the rule (case-insensitive; the seed's Agem is agem, the A-GEM paper's rule): "
    + "; ".join(f"{v.name}: {v.help}" for v in registry.VARIANTS.values()),
  )
  add(seed, "--n_tasks", type=int, default=d["n_tasks"], help="number of tasks")
  add(seed, "--lr", type=float, default=d["lr"], help="SGD learning rate")
  add(seed, "--n_memories", type=int, default=d["n_memories"], help="memory slots per task")
  add(
    seed,
    "--memory_strength",
    type=float,
    default=d["memory_strength"],
    help="GEM's QP margin (gem, agem_old, agem_qp_mean)",
  )
  add(seed, "--n_layers", type=int, default=d["n_layers"], help="hidden layers of the MLP")
  add(seed, "--n_hiddens", type=int, default=d["n_hiddens"], help="units per hidden layer")
  add(
    seed,
    "--data_path",
    default=None,
    help=f"folder of the 4 IDX files; when not given: ${data.DATA_PATH_ENV}, else "
    f"{data.DEFAULT_DATA_PATH} for fashion_mnist. With --data_file, a folder without them "
    "(GEM's folder of .pt files) falls back to the default",
  )
  add(seed, "--save_path", default=d["save_path"], help="root folder of the results folders")
  add(seed, "--batch_size", type=int, default=d["batch_size"], help="examples per SGD step")
  add(
    seed,
    "--log_every",
    type=int,
    default=d["log_every"],
    help="evaluate all tasks every this many steps (0: at task ends only)",
  )
  add(
    seed,
    "--samples_per_task",
    type=int,
    default=d["samples_per_task"],
    help="training examples per task",
  )
  add(
    seed,
    "--cuda",
    type=_yes_no,
    default="no",
    metavar="{yes,no}",
    help="accepted; JAX picks the device itself",
  )
  add(seed, "--seed", type=int, default=d["seed"], help="seeds the tasks, the data and the model")
  add(
    seed,
    "--replay_batch_size",
    type=int,
    default=d["replay_batch_size"],
    help="agem with --agem_ref pooled: examples sampled from the pooled memory",
  )
  add(
    seed,
    "--data_file",
    default=None,
    help="GEM's prepared file, e.g. fashion_mnist_permutations_reduced.pt: not read; sets "
    "--dataset and --protocol when they are not given",
  )

  unused = p.add_argument_group("GEM's flags that no variant uses (accepted and recorded)")
  types = {
    "beta": float,
    "gamma": float,
    "memories": int,
    "batches_per_example": int,
    "forgetting_mode": _boolean,
    "forgetting_task_ids": _int_list,
    "forgetting_resee_size": int,
    "sign_attacked": float,
  }
  for name in SEED_ONLY_FLAGS:
    metavar = "{True,False}" if types[name] is _boolean else None
    add(unused, f"--{name}", type=types[name], default=None, metavar=metavar, help="unused")

  grouped = p.add_argument_group(
    f"Grouped GEM ({', '.join(train.GROUPED_VARIANTS)}): the seed's flags, then cljax's"
  )
  helps = {
    "num_groups": "groups of hidden units per layer, formed after task 0 (with "
    "--create_group_per_unit: n_hiddens)",
    "cov_recompute_every": "recompute the task relatedness every this many steps of a task",
    "create_random_groups": "random balanced groups instead of clusters of similar units",
    "create_group_per_unit": "one unit per group",
    "divergence": "the divergence between tasks' covariances (only von_Neumann)",
    "if_output_cov": "covariances with the network's outputs instead of the label",
    "cov_first_task_buffer": "task 0's examples kept (reservoir) for its covariance",
    "ewc_reverse": "weigh the most different past tasks most (softmax of +divergence)",
    "gem_sub_mean": "subtract each task and layer's mean weight over its groups",
    "gem_ignore_relatedness": "multipliers h = 1: the rows of plain GEM",
    "bias_once": "count each next layer's bias once (False: once per group, as the research "
    "code's rows)",
    "relatedness_margin": "added to every multiplier h after its re-centring to mean 1",
    "cluster_iters": "Lloyd iterations of the clustering",
    "cluster_max_size": "at most this many units per cluster group (default 2 ceil(H/G))",
  }
  for name, default in GROUPED_FLAGS.items():
    kind = type(default) if default is not None else int
    kind = {bool: _boolean}.get(kind, kind)
    metavar = "{True,False}" if kind is _boolean else None
    add(grouped, f"--{name}", type=kind, default=default, metavar=metavar, help=helps[name])

  own = p.add_argument_group("cljax's flags")
  add(
    own,
    "--dataset",
    default=d["dataset"],
    choices=data.DATASETS,
    help="the images (or from --data_file)",
  )
  add(
    own,
    "--protocol",
    default=d["protocol"],
    choices=tasks.PROTOCOLS,
    help="the tasks (or from --data_file)",
  )
  add(
    own,
    "--source",
    default="auto",
    choices=data.SOURCES,
    help="auto: IDX files when present, else TFDS when installed",
  )
  add(own, "--tfds_data_dir", default=None, help="TensorFlow Datasets data directory")
  add(
    own,
    "--test_samples",
    type=int,
    default=None,
    help="test examples per task; not given: the whole test split",
  )
  add(
    own,
    "--agem_ref",
    default=train.Config.agem_ref,
    choices=train.AGEM_REFS,
    help="agem's reference gradient: a sample of the pooled memory (the A-GEM paper) or the "
    "mean of the per-task memory gradients",
  )
  add(own, "--eps", type=float, default=train.Config.eps, help="ridge on the QP's Gram matrix")
  add(
    own,
    "--init",
    default=train.Config.init,
    choices=models.INIT_SCHEMES,
    help="parameter init: gem (the GEM code's Xavier uniform), torch (nn.Linear's) or flax",
  )
  add(
    own,
    "--eval_batch_size",
    type=int,
    default=train.Config.eval_batch_size,
    help="test examples per evaluation batch",
  )
  add(
    own,
    "--qp_max_iter",
    type=int,
    default=train.Config.qp_max_iter,
    help="iteration cap of the QP solver",
  )
  add(
    own,
    "--memory_grads",
    default=train.Config.memory_grads,
    choices=train.MEMORY_GRADS,
    help="memory gradients from per-example factors (fast, the MLP) or one backward pass per "
    "past task (explicit rows); the same numbers up to rounding",
  )
  rules = ", ".join(f"{v} = {'/'.join(r)}" for v, r in train.AGEM_RULES.items())
  add(
    own,
    "--reference_row",
    default=None,
    choices=train.REFERENCE_ROWS,
    help="A-GEM family: the reference row, the mean or the sum of the per-task memory gradients "
    f"(default: the variant's; presets reference_row/trigger/projection: {rules})",
  )
  add(
    own,
    "--trigger",
    default=None,
    choices=train.TRIGGERS,
    help="A-GEM family: when g may change: <g, ref> < 0 (reference) or GEM's per-task check "
    "(per_task)",
  )
  add(
    own,
    "--projection",
    default=None,
    choices=train.PROJECTIONS,
    help="A-GEM family: the paper's conditional projection, the unconditional removal of the "
    "ref component, or GEM's QP on the one row (margin --memory_strength)",
  )
  own.add_argument("--no_plots", action=_StoreTrue, help="do not write the PNG plots")
  return p


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


def uses_qp(variant: str, projection: str | None = None) -> bool:
  """Whether a run solves GEM's QP with margin memory_strength (reads it, eps, qp_max_iter)."""
  return registry.uses_qp(variant, projection)


# The registry's rule settings as flags (argparse dests): "grouped" is the grouped variants' flags.
_RULE_DESTS = {
  name: tuple(GROUPED_FLAGS) if name == "grouped" else (name,) for name in registry.RULE_SETTINGS
}


def unused_dests(variant: str, agem_ref: str, projection: str | None = None) -> frozenset[str]:
  """The flags (argparse dests) that `variant` does not read: reported as unused when given."""
  reads = registry.settings_read(variant, agem_ref, projection)
  unused = {d for name, dests in _RULE_DESTS.items() if name not in reads for d in dests}
  return frozenset(unused | set(SEED_ONLY_FLAGS))


def unused_flags(args: argparse.Namespace) -> list[str]:
  """The flags given on the command line that the variant does not use, each once, in order."""
  unused = unused_dests(args.model, args.agem_ref, args.projection)
  return [f"--{dest}" for dest in args.given if dest in unused]


def parse_args(
  argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> tuple[argparse.Namespace, list[str]]:
  """Parses and checks a command line; returns the settings and the notes to show.

  The returned namespace has every flag's value and `given`, the flags given explicitly (a dict
  dest -> option string, in command-line order).
  Notes (one line each): the given flags the variant does not use, and the dataset and protocol
  taken from --data_file.

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
      raise CljaxError(f"unknown flag{s}: {', '.join(flags)} ({_HELP_HINT})")
    raise CljaxError(f"unexpected argument {extra[0]!r} (flags take the form --name value)")
  notes = []
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
  unused = unused_flags(args)
  if unused:
    what = registry.describe(args.model, args.agem_ref)[1].replace("(agem_ref", "(--agem_ref")
    notes.insert(0, f"flags not used by {what}: {', '.join(unused)}")
  return args, notes


def grouped_config(args: argparse.Namespace) -> GroupedConfig:
  """The grouped variants' `GroupedConfig` from the flags (the default one for other variants)."""
  if args.model not in train.GROUPED_VARIANTS:
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
  return GroupedConfig(
    num_groups=num_groups,
    grouping=grouping,
    cov_first_task_buffer=args.cov_first_task_buffer,
    cov_recompute_every=args.cov_recompute_every,
    if_output_cov=args.if_output_cov,
    ewc_reverse=args.ewc_reverse,
    sub_mean=args.gem_sub_mean,
    margin=args.relatedness_margin,
    ignore_relatedness=args.gem_ignore_relatedness,
    bias_once=args.bias_once,
    cluster_iters=args.cluster_iters,
    cluster_max_size=args.cluster_max_size,
  )


def name_parts(args: argparse.Namespace) -> dict[str, Any]:
  """The settings that name a run besides its variant (`results.run_name`'s rule).

  The A-GEM rule overrides (None when not set) and, for the grouped variants, the grouped flags
  given with a value other than their default.
  """
  parts = {name: getattr(args, name) for name in _RULE_FLAGS}
  if args.model in train.GROUPED_VARIANTS:
    for name, default in GROUPED_FLAGS.items():
      if name in args.given and getattr(args, name) != default:
        parts[name] = getattr(args, name)
  return parts


def train_config(args: argparse.Namespace) -> train.Config:
  """The engine's `Config` from parsed arguments (raises CljaxError on bad values)."""
  return train.Config(
    variant=args.model,
    batch_size=args.batch_size,
    lr=args.lr,
    n_memories=args.n_memories,
    memory_strength=args.memory_strength,
    n_layers=args.n_layers,
    n_hiddens=args.n_hiddens,
    init=args.init,
    agem_ref=args.agem_ref,
    replay_batch_size=args.replay_batch_size,
    log_every=args.log_every,
    eps=args.eps,
    eval_batch_size=args.eval_batch_size,
    qp_max_iter=args.qp_max_iter,
    memory_grads=args.memory_grads,
    **{name: getattr(args, name) for name in _RULE_FLAGS},
    grouped=grouped_config(args),
  )


def _has_idx_files(directory: str) -> bool:
  """Whether directory holds any of the four IDX files (gzipped or plain)."""
  return any(
    os.path.isfile(os.path.join(directory, stem + ext))
    for stem in data.IDX_FILES.values()
    for ext in ("", ".gz")
  )


def _data_path(args: argparse.Namespace) -> tuple[str | None, str | None]:
  """(IDX folder to read or None for the default, note or None) for the settings.

  GEM's --data_path is a folder of .pt files: with --data_file, a folder without IDX files falls
  back to the default data location, with a note.
  """
  path = args.data_path
  if path and args.data_file is not None and args.source != "tfds" and not _has_idx_files(path):
    note = (
      f"--data_path {path} holds no IDX files (GEM's folder of .pt files); reading "
      f"{args.dataset} from the default location instead"
    )
    return None, note
  return path, None


def _load_streams(args: argparse.Namespace, data_path: str | None, seeds: Sequence[int]):
  """(streams, source, IDX folder or None, warnings): one task stream per seed."""
  source = data.resolve_source(args.dataset, data_path=data_path, source=args.source)
  directory = data.resolve_data_path(args.dataset, data_path) if source == "idx" else None
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", UserWarning)
    dataset = data.load_dataset(
      args.dataset, data_path=data_path, source=source, tfds_data_dir=args.tfds_data_dir
    )
    streams = [
      tasks.make_stream(
        dataset,
        protocol=args.protocol,
        n_tasks=args.n_tasks,
        samples_per_task=args.samples_per_task,
        test_samples=args.test_samples,
        seed=seed,
      )
      for seed in seeds
    ]
  messages = []
  for w in caught:
    if issubclass(w.category, UserWarning):
      if str(w.message) not in messages:
        messages.append(str(w.message))
    else:
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  return streams, source, directory, messages


def _load_stream(args: argparse.Namespace, data_path: str | None):
  """(stream, source, IDX folder or None, warnings): the task stream the settings describe."""
  streams, source, directory, messages = _load_streams(args, data_path, [args.seed])
  return streams[0], source, directory, messages


class _Prepared(NamedTuple):
  """Everything a run needs, checked before compiling."""

  args: argparse.Namespace
  config: train.Config
  stream: tasks.TaskStream
  source: str  # "idx" or "tfds"
  directory: str | None  # the IDX folder read
  folder: str  # the results folder
  schedule: tuple[int, int, int]  # train.schedule


def _prepare(argv: Sequence[str] | None) -> _Prepared:
  """Parses, checks and loads the data, printing notes and warnings as they come (CljaxError)."""
  args, notes = parse_args(argv)
  for message in notes:
    _note(message)
  config = train_config(args)
  name = results.run_name(
    args.model,
    args.dataset,
    args.protocol,
    args.seed,
    agem_ref=args.agem_ref,
    rule=name_parts(args),
  )
  data_path, note = _data_path(args)
  if note:
    _note(note)
  stream, source, directory, load_warnings = _load_stream(args, data_path)
  for message in load_warnings:
    print(f"{_PROG}: warning: {message}", file=sys.stderr)
  schedule = train.schedule(config, stream)
  return _Prepared(
    args, config, stream, source, directory, os.path.join(args.save_path, name), schedule
  )


def _train(p: _Prepared) -> tuple[train.RunResult, float, float]:
  """Compiles and runs, printing a progress line per task; (host result, compile s, run s)."""
  n_tasks = p.stream.train_idx.shape[0]
  run_start = [0.0]

  def progress(t, acc_row):
    t, acc = int(t), np.asarray(acc_row)
    print(
      f"task {t} done ({t + 1}/{n_tasks}): {time.perf_counter() - run_start[0]:.1f} s, "
      f"accuracy {acc[t]:.4f} on task {t}, mean {acc[: t + 1].mean():.4f} on tasks 0-{t}",
      flush=True,
    )

  key = jax.random.key(p.args.seed)
  hp = train.default_hparams(p.config)  # an argument, as in a sweep: the same compiled program
  t0 = time.perf_counter()
  run = jax.jit(train.make_train(p.config, progress=progress))
  compiled = run.lower(key, p.stream, hp).compile()
  t1 = run_start[0] = time.perf_counter()
  result = jax.device_get(jax.block_until_ready(compiled(key, p.stream, hp)))
  return result, t1 - t0, time.perf_counter() - t1


def _record(p: _Prepared, result, timings, device, argv) -> dict[str, Any]:
  settings = {k: v for k, v in vars(p.args).items() if k != "given"}
  settings["given_flags"] = [f"--{d}" for d in p.args.given]
  steps, chunk, n_chunks = p.schedule
  return results.make_record(
    result,
    p.config,
    settings=settings,
    timings=timings,
    device=device,
    argv=list(sys.argv[1:] if argv is None else argv),
    unused_flags=unused_flags(p.args),
    stream={
      "source": p.source,
      "data_path": p.directory,
      "n_tasks": int(p.stream.train_idx.shape[0]),
      "samples_per_task": int(p.stream.train_idx.shape[1]),
      "test_samples": int(p.stream.test_x.shape[0]),
      "train_images": int(p.stream.train_x.shape[0]),
    },
    schedule={"steps_per_task": steps, "steps_per_chunk": chunk, "chunks_per_task": n_chunks},
  )


def _divergence_message(
  t: int, n_tasks: int, variant: str, folder: str, projection: str | None = None
) -> str:
  if t + 2 == n_tasks:
    rest = f"task {t + 1} was not trained; "
  elif t + 1 < n_tasks:
    rest = f"tasks {t + 1}-{n_tasks - 1} were not trained; "
  else:
    rest = ""
  knobs = "--lr or --memory_strength" if uses_qp(variant, projection) else "--lr"
  return (
    f"parameters became non-finite while training task {t}; {rest}results so far are kept in "
    f"{folder}; try a lower {knobs}"
  )


def _note(message: str) -> None:
  print(f"{_PROG}: note: {message}", file=sys.stderr)


def _error(message: Any) -> None:
  print(f"{_PROG}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit status.

  0: done; 1: the run diverged (results kept); 2: bad input (reported on one line).
  """
  start = time.perf_counter()
  try:
    p = _prepare(argv)
  except SystemExit as e:  # --help
    return int(e.code or 0)
  except CljaxError as e:
    _error(e)
    return 2
  data_seconds = time.perf_counter() - start
  args = p.args
  device = results.device_info()
  if "cuda" in args.given:
    _note(
      f"--cuda {args.cuda}: JAX picks the device itself; running on {device['platform']} "
      f"({device['device_kind']})"
    )
  plots = not args.no_plots
  if plots and not results.plotting_available():
    _note("matplotlib is not installed (pip install 'cljax[plot]'): no PNGs will be written")
    plots = False
  try:
    os.makedirs(p.folder, exist_ok=True)
  except OSError as e:
    _error(f"cannot create the results folder {p.folder}: {e.strerror or e}")
    return 2

  n_tasks, samples = (int(n) for n in p.stream.train_idx.shape)
  where = f"{p.source}: {p.directory}" if p.directory else p.source
  print(
    f"{args.model} on {args.dataset} {args.protocol} ({where}): {n_tasks} tasks x {samples} "
    f"samples, {p.stream.test_x.shape[0]} test; seed {args.seed}; device {device['platform']}",
    flush=True,
  )
  try:
    result, compile_seconds, run_seconds = _train(p)
  except CljaxError as e:
    _error(e)
    return 2
  seconds = {
    "data_load": data_seconds,
    "compile": compile_seconds,
    "run": run_seconds,
    "total": time.perf_counter() - start,
  }
  timings = {k: round(v, 4) for k, v in seconds.items()}
  record = _record(p, result, timings, device, argv)
  print(record["seed_line"])
  print(
    f"wall time: {timings['total']:.1f} s (data {timings['data_load']:.1f} s, compile "
    f"{timings['compile']:.1f} s, run {timings['run']:.1f} s)"
  )
  try:
    results.write_results(p.folder, record, plots=plots)
  except OSError as e:
    _error(f"cannot write the results to {p.folder}: {e.strerror or e}")
    return 2
  print(f"results: {p.folder}")
  diverged = record["diverged_at_task"]
  if diverged is not None:
    _error(_divergence_message(diverged, n_tasks, args.model, p.folder, args.projection))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""RunConfig: the training run's settings, typed and checked once, before any data preparation or write.

`RunConfig.from_cfg(cfg, output_dir)` reads the composed Hydra config into dataclasses whose
`__post_init__` checks every field with the project's one-line error (`ConfigError`, printed as
`error: <key>=<value>: <rule>`, exit status 2): the optimizer (OptimConfig), the schedule
(SchedulerConfig), the Lightning Trainer settings (TrainerSettings: accelerator and devices this machine
has, step-based intervals, precision), the data settings (DataSettings: sizes, a writable cache dir),
and the run itself (seed, compile, resume, cpu_threads, tags, a writable run dir, a model that fits in memory).
The options of every node Hydra will instantiate (callbacks, loggers, trainer.strategy ...) are checked against
their target: the name, the value against the __init__ annotation, then the value rules a class of this package
declares (`check_config_options`). Keys are named as the user types them (`optim.lr`, `trainer.devices`). The
Trainer keeps any extra `trainer.*` keys as given; the data module is still built by Hydra from `cfg.data`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from deepseek_mini.config import ConfigError, ModelConfig, count_parameters
from deepseek_mini.training.sizing import apply_sizing

TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0", "null", "none", "")
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "bf16-true", "16-true", "64-true",
              "64", "transformer-engine", "transformer-engine-float16")
OPTIMIZER_STATE_BYTES = 16  # per parameter: fp32 weight + fp32 gradient + two fp32 AdamW moments


def _fail(key: str, value: Any, rule: str):
    raise ConfigError(f"{key}={value!r}: {rule}")


def as_bool(key: str, value: Any) -> bool:
    """true/false and the other spellings YAML and shells use (yes/no, on/off, 1/0)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if value is not None else ""
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    _fail(key, value, "use true or false")


def as_int(key: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(key, value, "must be a positive integer" if low == 1 else f"must be an integer >= {low}")
    return int(value)


SEED_MAX = 2**32 - 1  # numpy's seed range, which Lightning's seed_everything and the data order use


def as_seed(value: Any) -> int:
    """seed: an integer in [0, 2**32 - 1] (a larger one ended in seed_everything's ValueError traceback)."""
    as_int("seed", value, low=0)
    if value > SEED_MAX:
        _fail("seed", value, f"must be an integer >= 0 and <= {SEED_MAX} (numpy's seed range)")
    return int(value)


def as_float(key: str, value: Any, low: float, high: float = math.inf, *, low_ok: bool = False,
             high_ok: bool = True, rule: str | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value >= low if low_ok else value > low) and (value <= high if high_ok else value < high)
    if not ok:
        _fail(key, value, rule or f"must be a number in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}")
    return float(value)


def dir_problem(path: Any) -> str | None:
    """Why no directory can be made (or written) at `path`, checked without creating anything; None when one can:
    its nearest existing part must be a directory this process can write into."""
    probe = Path(str(path)).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"directory {probe} is not writable"
    return None


def writable_dir(key: str, path: Any) -> Path:
    """`path` can be created and written (dir_problem), as a ConfigError naming `key`."""
    problem = dir_problem(path)
    if problem is not None:
        _fail(key, str(path), problem if problem.startswith("directory") else f"cannot create a directory here: {problem}")
    return Path(str(path)).expanduser().absolute()


def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _resolved_where_possible(node: DictConfig) -> dict:
    """A node Hydra will instantiate, as a dict with its interpolations resolved (the preflight sets
    paths.output_dir), so `${trainer.x}` is checked as its value; unresolved where one has no value yet (its
    options are then checked by name, and an interpolation where it points)."""
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:
        return OmegaConf.to_container(node, resolve=False)


def model_config_from(cfg: DictConfig) -> ModelConfig:
    """cfg.model -> validated ModelConfig, keys named as the user writes them (model.x)."""
    if "model" not in cfg or cfg.model is None:
        raise ConfigError("no model config: choose one with model=<preset>")
    try:  # `sizing:` (sweep experiments): iso-FLOP expert widths etc., see deepseek_mini/training/sizing.py
        return ModelConfig.from_dict(apply_sizing(_container(cfg.model), _container(cfg.get("sizing"))))
    except ConfigError as e:
        raise ConfigError(str(e).replace("ModelConfig.", "model.").replace("ModelConfig:", "model:")) from None


def resolve_precision(trainer_cfg: dict) -> str:
    precision = str(trainer_cfg.get("precision", "auto"))
    if precision != "auto":
        return precision
    accel = str(trainer_cfg.get("accelerator", "auto"))
    gpu = torch.cuda.is_available() and accel in ("auto", "gpu", "cuda")
    return "bf16-mixed" if gpu else "32-true"


# ---------------------------------------------------------------------- groups
@dataclass(frozen=True)
class OptimConfig:
    """configs/optim/adamw.yaml."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    fused: bool | str = "auto"
    bf16_weights: bool | str = "auto"
    moments_dtype: str = "auto"
    name: str = "adamw"

    def __post_init__(self):
        from deepseek_mini.optim.policy import adamw_kind, moments_dtype
        from deepseek_mini.optim.precision import check_bf16_weights

        if self.name != "adamw":
            _fail("optim.name", self.name, "the only optimizer is adamw")
        as_float("optim.lr", self.lr, 0.0, rule="must be a positive number")
        betas = self.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            _fail("optim.betas", betas, "give two numbers in [0, 1), e.g. [0.9,0.95]")
        for b in betas:
            as_float("optim.betas", b, 0.0, 1.0, low_ok=True, high_ok=False, rule="each beta must be in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        as_float("optim.eps", self.eps, 0.0, rule="must be a positive number")
        as_float("optim.weight_decay", self.weight_decay, 0.0, low_ok=True, rule="must be a number >= 0")
        try:  # the optimizer policy's own checks (the Triton step's rules, as on a GPU)
            adamw_kind(self.fused, on_cuda=False)
            check_bf16_weights(self.bf16_weights)
            moments_dtype(self.moments_dtype, "triton", self.betas)
        except ValueError as e:
            raise ConfigError(str(e)) from None


SCHEDULES = ("warmup_cosine", "step", "constant")


@dataclass(frozen=True)
class SchedulerConfig:
    """configs/scheduler/*.yaml (fields a schedule does not use keep their defaults)."""

    name: str
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    milestones: tuple[float, ...] = (0.8, 0.9)
    gamma: float = 0.316

    def __post_init__(self):
        if self.name not in SCHEDULES:
            _fail("scheduler.name", self.name, f"use one of {', '.join(SCHEDULES)}")
        as_int("scheduler.warmup_steps", self.warmup_steps, low=0)
        as_float("scheduler.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, low_ok=True)
        if not isinstance(self.milestones, (list, tuple)) or any(
                isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1 for m in self.milestones):
            _fail("scheduler.milestones", self.milestones, "fractions of trainer.max_steps in (0, 1]")
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        as_float("scheduler.gamma", self.gamma, 0.0, 1.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


def _visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _strategy_name(strategy: Any) -> str:
    """trainer.strategy as a lower-case name: a node's _target_ or Lightning's strategy name ("" when unset)."""
    if isinstance(strategy, dict):
        strategy = strategy.get("_target_", "")
    return str(strategy or "").lower()


def _is_fsdp(strategy: Any) -> bool:
    """trainer=fsdp: a strategy node whose _target_ builds an FSDPStrategy, or Lightning's strategy names."""
    return "fsdp" in _strategy_name(strategy)


def check_multi_device(accelerator: Any, devices: Any, strategy: Any) -> None:
    """Multi-GPU settings this machine cannot run, refused before data preparation (Lightning and torch would
    fail later, deep inside the strategy's setup): FSDP without a CUDA GPU."""
    if not _is_fsdp(strategy):
        return
    buffers = strategy.get("buffer_dtype") if isinstance(strategy, dict) else None
    if buffers is not None and str(buffers).lower() not in ("float32", "fp32"):
        raise ConfigError(f"trainer.strategy.buffer_dtype={buffers!r}: the router's expert counts and biases "
                          "must stay float32 (use float32)")
    accel = str(accelerator).lower()
    if accel == "cpu":
        raise ConfigError("trainer=fsdp: FSDP needs CUDA GPUs, it cannot run with trainer.accelerator='cpu'; "
                          "for a CPU check of multi-process training use trainer=ddp trainer.accelerator=cpu")
    if _visible_gpus() == 0:
        raise ConfigError("trainer=fsdp: FSDP needs CUDA GPUs and this machine has none; "
                          "for a CPU check of multi-process training use trainer=ddp trainer.accelerator=cpu")


def _parameters(fn) -> tuple[dict[str, inspect.Parameter], bool]:
    """The named parameters of a function or class (its __init__), and whether it also takes **kwargs. Their
    annotations are evaluated where they resolve (`from __future__ import annotations` leaves them strings), so
    that _check_option can check a value against them; where they do not, they stay strings and go unchecked."""
    try:
        params = inspect.signature(fn, eval_str=True).parameters
    except Exception:  # an annotation naming what its module imports only for type checkers, ...
        params = inspect.signature(fn).parameters
    named = {k: p for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and k != "self"}
    return named, any(p.kind == p.VAR_KEYWORD for p in params.values())


def _locate(path: str) -> Any:
    """`a.b.C` -> the object, as Hydra's `_target_` names it (the longest importable module, then attributes).
    Not hydra.utils.get_object: it logs its own error line before raising, and a bad target is one line here."""
    import importlib

    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"no module of {path!r} can be imported")


def _kwargs_go_to(base: type) -> Any | None:
    """Where a class's **kwargs go, where that is known: Lightning's DDPStrategy to torch's DistributedDataParallel,
    FSDPStrategy to FullyShardedDataParallel, WandbLogger to wandb.init (imported only when a wandb logger is
    configured), our TextDataModule to the CorpusSpec its corpus keywords build."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from deepseek_mini.data.corpus import CorpusSpec
    from deepseek_mini.data.datamodule import TextDataModule

    if base is DDPStrategy:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel
    if base is FSDPStrategy:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel
    if base is TextDataModule:
        return CorpusSpec
    if base.__module__ == "lightning.pytorch.loggers.wandb" and base.__name__ == "WandbLogger":
        import wandb

        return wandb.init
    return None


def target_parameters(target: str) -> tuple[dict[str, inspect.Parameter], bool, list[str]]:
    """What a config node's `_target_` accepts, following where its **kwargs go where that is known: this
    package's classes hand them to their base class, and _kwargs_go_to names where some others send them; a
    factory function is followed through its return annotation. Returns the named parameters found, whether
    they are all it accepts (False when **kwargs lead somewhere unknown, or the target cannot be inspected), and
    the wrappers followed."""
    import typing

    obj, followed = _locate(target), []
    try:
        accepted, open_ended = _parameters(obj)
        cls = obj if isinstance(obj, type) else typing.get_type_hints(obj).get("return")
        while open_ended and cls is not None:
            if not isinstance(cls, type):  # a function the **kwargs go to (wandb.init)
                named, open_ended = _parameters(cls)
                accepted.update(named)
                break
            nxt = None
            for base in cls.__mro__:
                if base is object or "__init__" not in vars(base):
                    continue
                named, open_ended = _parameters(base)
                accepted.update(named)
                nxt = _kwargs_go_to(base) if open_ended else None
                if nxt is not None:  # its **kwargs go there, not to its own base classes
                    followed.append(nxt.__name__)
                    break
                if not open_ended or not base.__module__.startswith("deepseek_mini."):
                    break  # all named, or **kwargs that a class not of this package may send anywhere
            cls = nxt
    except (TypeError, ValueError, NameError):  # no signature, or annotations that do not resolve: unchecked
        return {}, False, followed
    return accepted, not open_ended, followed


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The annotations whose values are checked before data preparation: what Hydra can hand over from a command line
# (a word, a number, true/false, null). Anything else (Path, timedelta, a class, a container) is left to the target.
_SIMPLE_TYPES = {
    int: (_is_int, "an integer"),
    float: (lambda v: _is_int(v) or (isinstance(v, float) and math.isfinite(v)), "a finite number"),
    str: (lambda v: isinstance(v, str), "text"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    type(None): (lambda v: v is None, "null"),
}


def _annotation_rules(annotation: Any) -> list[tuple[Any, str]] | None:
    """An annotation as (accepts(value), what that is) alternatives, or None where any part of it is a type not
    checked here (the value is then the target's to judge: refusing what it would take is worse than missing)."""
    import types
    import typing

    if annotation in _SIMPLE_TYPES:
        return [_SIMPLE_TYPES[annotation]]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:  # each allowed value an alternative of its own (type too: 1 is not True)
        return [(lambda v, c=c: v == c and type(v) is type(c), str(c)) for c in typing.get_args(annotation)]
    if origin in (typing.Union, types.UnionType):
        rules = [_annotation_rules(a) for a in typing.get_args(annotation)]
        return None if any(r is None for r in rules) else [r for alts in rules for r in alts]
    return None


def _check_option(key: str, value: Any, param: inspect.Parameter) -> None:
    """One option's value against the parameter that receives it: its annotation where that is one of the plain
    types (int, float, str, bool, Literal, Optional/Union of those), else a bool default's true/false. A word where
    a number belongs used to reach the target's __init__ after data preparation (Hydra's two-line "Error in call
    to target"), or the target's first use of it, after training had run."""
    if isinstance(value, str) and value.startswith("${"):  # an interpolation: checked where it points to
        return
    if isinstance(value, dict) and "_target_" in value:  # a node of its own: check_node_options checks it
        return
    rules = _annotation_rules(param.annotation)
    if rules is None:
        if isinstance(param.default, bool) and not isinstance(value, bool):
            _fail(key, value, "must be true or false")
        return
    if not any(accepts(value) for accepts, _ in rules):
        names = list(dict.fromkeys(name for _, name in rules))
        if len(names) > 1:
            names = ["true/false" if n == "true or false" else n for n in names]
        what = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        number = _is_int(value) or isinstance(value, float)
        hint = " (a number in quotes is text: '\"123\"')" if number and "text" in names else ""
        _fail(key, value, f"must be {what}{hint}")


def _option_defaults(accepted: dict[str, inspect.Parameter]) -> dict[str, Any]:
    return {k: p.default for k, p in accepted.items() if p.default is not inspect.Parameter.empty}


def check_node_options(group: str, node: Any, model: ModelConfig | None = None) -> None:
    """A config node Hydra will instantiate (`_target_` + options): every option is one its target accepts, of the
    type it is annotated with; then the target's own value rules, where this package's class declares them as a
    `check_config_options(options, key, model)` static method (options: every option's value, the class defaults
    filled in; key: the node's config path; model: the run's ModelConfig, when known)."""
    if not (isinstance(node, dict) and "_target_" in node):
        return
    target = node["_target_"]
    try:
        accepted, complete, followed = target_parameters(target)
        obj = _locate(target)
    except (ImportError, AttributeError) as e:
        _fail(f"{group}._target_", target, f"cannot be imported ({str(e).splitlines()[0]})")
    for key, value in node.items():
        if key.startswith("_"):
            continue
        if key in accepted:
            _check_option(f"{group}.{key}", value, accepted[key])
            _check_lightning_word(f"{group}.{key}", key, value, accepted[key])
        elif complete:
            _fail(f"{group}.{key}", value, f"not an option of {' or '.join([target.rsplit('.', 1)[-1], *followed])}")
    rules = getattr(obj, "check_config_options", None)
    if callable(rules) and getattr(obj, "__module__", "").startswith("deepseek_mini."):
        given = {k: v for k, v in node.items()
                 if not k.startswith("_") and not (isinstance(v, str) and v.startswith("${"))}
        rules({**_option_defaults(accepted), **given}, group, model)


def check_trainer_options(extra: dict) -> None:
    """The Trainer arguments and strategy options a config or a `+trainer.x=...` override adds, checked against
    the signatures that will receive them. An unknown name, or a word where a flag is expected, used to surface
    as a TypeError traceback from Lightning's Trainer, or from DDP on every rank after data preparation."""
    import lightning.pytorch as pl

    trainer_args, _ = _parameters(pl.Trainer)
    for key, value in extra.items():
        if key not in trainer_args:
            _fail(f"trainer.{key}", value, "not an argument of lightning's Trainer")
        _check_option(f"trainer.{key}", value, trainer_args[key])
        _check_trainer_word(key, value)
        # a node with a _target_ (the strategy, a profiler, plugins) is built by strategies.build_trainer_nodes
        for i, node in enumerate(value if isinstance(value, list) else [value]):
            check_node_options(f"trainer.{key}" + (f"[{i}]" if isinstance(value, list) else ""), node)


def _check_lightning_word(full_key: str, key: str, value: Any, param: inspect.Parameter) -> None:
    """Options of Lightning's and torch's classes whose annotation admits any text or a class, but whose values are
    a fixed set or a duration: a wrong one surfaced when the strategy set up its process group, after data
    preparation, on every rank."""
    if key == "process_group_backend" and value not in (None, "nccl", "gloo", "mpi", "ucc", "cuda:nccl,cpu:gloo"):
        _fail(full_key, value, "use nccl, gloo, mpi or ucc, or null (nccl on GPUs, gloo on the CPU)")
    if key == "timeout" and value is not None and "timedelta" in str(param.annotation):
        _fail(full_key, value, "a timedelta, which a config cannot write: leave it to the strategy's default")


def _check_trainer_word(key: str, value: Any) -> None:
    """Trainer arguments that also take a class (so their annotation is not checked above) given as the plain word
    or mapping Lightning parses itself, in Trainer() after data preparation, with a traceback: checked here by
    Lightning's own rules."""
    if key == "profiler" and isinstance(value, str) and value not in ("simple", "advanced", "pytorch", "xla"):
        _fail("trainer.profiler", value, "use simple, advanced, pytorch or xla (Lightning's profilers), or null")
    if key == "strategy" and isinstance(value, str):
        from lightning.pytorch.strategies import StrategyRegistry

        if value != "auto" and value not in StrategyRegistry.available_strategies():
            _fail("trainer.strategy", value, "not one of Lightning's strategies (use trainer=ddp, fsdp or ep, or auto)")
    if key == "max_time" and isinstance(value, (str, dict)):
        from lightning.pytorch.callbacks import Timer

        try:
            Timer(duration=value)
        except Exception:
            _fail("trainer.max_time", value, "use DD:HH:MM:SS or a mapping such as {hours: 1}")


def check_instantiated_options(cfg: DictConfig, model: ModelConfig | None = None) -> None:
    """The callbacks and loggers the run will instantiate, checked before data preparation (Hydra would raise
    on a misspelt option only when it builds them, after the tokenizer and token caches). Interpolations are
    resolved where they can be (the preflight sets paths.output_dir), so `${trainer.x}` is checked as its value."""
    for group in ("callbacks", "logger"):
        nodes = cfg.get(group)
        if isinstance(nodes, DictConfig):
            for name in nodes:
                node = nodes[name]  # None where the command dropped it (callbacks.samples=null)
                if node is None:
                    continue
                if not isinstance(node, DictConfig) or "_target_" not in node:
                    # a word or number was a TypeError traceback in build_callbacks; a mapping without a
                    # _target_ was skipped without a word
                    what = "callback" if group == "callbacks" else "logger"
                    shown = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
                    _fail(f"{group}.{name}", shown, f"not a {what}: a node with a _target_ (or null to drop one)")
                check_node_options(f"{group}.{name}", _resolved_where_possible(node), model)


@dataclass(frozen=True)
class TrainerSettings:
    """configs/trainer/*.yaml: the checked fields; `extra` holds every other Trainer argument as given."""

    max_steps: int
    val_check_interval: int
    log_every_n_steps: int = 10
    accumulate_grad_batches: int = 1
    accelerator: str = "auto"  # auto / cpu / gpu / cuda: a GPU asked for on a machine without one is refused
    devices: Any = 1  # a count, a list of device ids, -1 or "auto" (as Lightning reads it)
    num_nodes: int = 1
    precision: str = "auto"  # auto = bf16-mixed on a CUDA GPU, 32-true on CPU (resolve_precision)
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = "norm"
    limit_val_batches: int | float | None = 1.0  # None (null): all batches, as Lightning reads it
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.max_steps == -1:
            raise ConfigError("trainer.max_steps=-1: training is step-based, set a positive number of steps")
        as_int("trainer.max_steps", self.max_steps)
        if isinstance(self.val_check_interval, float):
            _fail("trainer.val_check_interval", self.val_check_interval,
                  "training is step-based: give a whole number of optimizer steps")
        as_int("trainer.val_check_interval", self.val_check_interval)
        as_int("trainer.log_every_n_steps", self.log_every_n_steps)
        as_int("trainer.accumulate_grad_batches", self.accumulate_grad_batches)
        as_int("trainer.num_nodes", self.num_nodes)
        lvb = self.limit_val_batches
        if lvb is not None and (isinstance(lvb, bool) or not (isinstance(lvb, int) and lvb >= 0
                                                            or isinstance(lvb, float) and 0 <= lvb <= 1)):
            _fail("trainer.limit_val_batches", lvb,
                  "a number of batches (integer >= 0), a fraction in [0, 1], or null for all")
        if self.gradient_clip_val is not None:
            as_float("trainer.gradient_clip_val", self.gradient_clip_val, 0.0, low_ok=True, rule="must be a number >= 0")
        if self.gradient_clip_algorithm not in (None, "norm", "value"):
            _fail("trainer.gradient_clip_algorithm", self.gradient_clip_algorithm, "use norm or value")
        if str(self.precision) not in PRECISIONS:
            _fail("trainer.precision", self.precision, f"use one of {', '.join(PRECISIONS[:8])}")
        check_trainer_options(self.extra)
        check_multi_device(self.accelerator, self.devices, self.extra.get("strategy"))
        self._check_devices()

    def _check_devices(self) -> None:
        accel, gpus = str(self.accelerator).lower(), _visible_gpus()
        if accel not in ("auto", "cpu", "gpu", "cuda", "mps", "tpu"):
            _fail("trainer.accelerator", self.accelerator, "use auto, cpu or gpu")
        if accel in ("gpu", "cuda") and gpus == 0:
            _fail("trainer.accelerator", self.accelerator, "this machine has no CUDA GPU (use trainer=cpu)")
        if accel == "mps" and not torch.backends.mps.is_available():
            _fail("trainer.accelerator", self.accelerator, "MPS is not available on this machine")
        if accel == "tpu":
            _fail("trainer.accelerator", self.accelerator, "TPUs are not supported; use auto, cpu or gpu")
        devices = self.devices
        on_gpu = accel in ("gpu", "cuda") or accel == "auto" and gpus > 0
        if not on_gpu and accel in ("auto", "cpu") and (devices in (-1, "-1") or isinstance(devices, (list, tuple))):
            # Lightning's CPUAccelerator takes a count only, and said so in a traceback after data preparation
            _fail("trainer.devices", list(devices) if isinstance(devices, (list, tuple)) else devices,
                  "on the CPU, a number of processes or auto (-1 and lists of device ids are for GPUs)")
        if devices in ("auto", -1, "-1"):
            return
        if isinstance(devices, (list, tuple)):
            n = len(devices)
            if on_gpu and any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < gpus for i in devices):
                _fail("trainer.devices", list(devices), f"GPU ids run from 0 to {gpus - 1} on this machine")
        elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
            n = devices
        else:
            _fail("trainer.devices", devices, "a positive number of devices, -1 (all) or a list of device ids")
        have = gpus if on_gpu else (os.cpu_count() or 1)
        what = "CUDA GPU(s)" if on_gpu else "CPU core(s)"
        if n > have:
            _fail("trainer.devices", devices, f"this machine has {have} {what}")

    def trainer_kwargs(self) -> dict:
        """The keyword arguments of lightning.Trainer (precision `auto` resolved)."""
        kw = {k: v for k, v in asdict(self).items() if k != "extra"}
        kw.update(self.extra)
        kw["precision"] = resolve_precision(kw)
        return kw

    @property
    def on_gpu(self) -> bool:
        accel = str(self.accelerator).lower()
        return accel in ("gpu", "cuda") or accel == "auto" and _visible_gpus() > 0

    @property
    def single_gpu(self) -> int | None:
        """The CUDA device index of a run on one GPU in one process (trainer.devices=1 or [i]), else None."""
        devices = self.devices
        if not self.on_gpu or self.num_nodes != 1:
            return None
        if isinstance(devices, (list, tuple)) and len(devices) == 1:
            return int(devices[0])
        if (devices == 1 and not isinstance(devices, bool)) or (devices in ("auto", -1, "-1") and _visible_gpus() == 1):
            return 0
        return None

    @property
    def world_size(self) -> int:
        """Processes the run will have: devices x num_nodes, as resume's world-size check counts them (1 where
        Lightning decides at start-up: devices=auto / -1 on a CPU)."""
        from deepseek_mini.training.resume import requested_world_size

        return requested_world_size({"devices": self.devices, "num_nodes": self.num_nodes,
                                     "accelerator": self.accelerator}) or 1


def check_val_fraction(limit: Any, n_windows: int, batch: int, world: int) -> None:
    """trainer.limit_val_batches as a fraction, once the data's validation windows are known: Lightning validates
    int(fraction x the batches each rank has) and refuses a fraction that leaves none (a traceback at the first
    validation; more ranks, fewer batches each)."""
    if isinstance(limit, bool) or not isinstance(limit, float) or not 0 < limit < 1:
        return
    per_rank = -(-n_windows // world)  # each rank's share of the windows (ceil), then in validation batches
    batches = -(-per_rank // batch)
    if batches and int(batches * limit) == 0:
        each = f"each of the {world} processes has" if world > 1 else "there are"
        _fail("trainer.limit_val_batches", limit, f"that fraction of the {batches} validation batch(es) {each} is "
              f"none; give at least {round(1 / batches, 3)}, or a number of batches")


def check_data_values(d: dict) -> None:
    """The data sizes' rules, for those of them `d` holds (DataSettings holds them all; a checkpoint's data.json,
    which eval.py reads back, what the run recorded)."""
    for key, low in (("seq_len", 1), ("batch_size", 1), ("num_workers", 0), ("num_proc", 1), ("vocab_size", 2),
                     ("seed", 0)):
        if key in d:
            as_int(f"data.{key}", d[key], low=low)
    for key in ("val_batch_size", "max_chars"):  # null: the batch size / no cap
        if d.get(key) is not None:
            as_int(f"data.{key}", d[key])
    if "val_fraction" in d:
        as_float("data.val_fraction", d["val_fraction"], 0.0, 1.0, high_ok=False)


@dataclass(frozen=True)
class DataSettings:
    """configs/data/*.yaml: the sizes the run depends on (the data module itself is built from cfg.data)."""

    seq_len: int
    batch_size: int
    cache_dir: str
    val_batch_size: int | None = None
    val_fraction: float = 0.05
    max_chars: int | None = None
    num_workers: int = 0
    num_proc: int = 1
    vocab_size: int = 4096
    seed: int = 1234

    def __post_init__(self):
        check_data_values(asdict(self))
        writable_dir("data.cache_dir", self.cache_dir)

    @property
    def samples_per_device_step(self) -> int:
        return self.batch_size


def _available_memory() -> tuple[int, str] | None:
    """Bytes this process can use for the model, and where: one GPU's memory, else the free RAM."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "one GPU's memory"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available RAM"
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(model: ModelConfig, shards: int = 1) -> None:
    """Refuse a model whose weights, gradients and AdamW moments alone exceed the machine's memory
    (activations come on top). `shards`: FSDP spreads them over the ranks."""
    avail = _available_memory()
    if avail is None:
        return
    n = count_parameters(model).total
    need = n * OPTIMIZER_STATE_BYTES / max(1, shards)
    if need > avail[0]:
        raise ConfigError(f"model: {n / 1e6:,.0f}M parameters need {need / 2**30:,.1f} GiB for fp32 weights, "
                          f"gradients and AdamW moments, more than the {avail[0] / 2**30:,.1f} GiB of {avail[1]}; "
                          "choose a smaller model (e.g. model=tiny) or more GPUs with trainer=fsdp")


# ---------------------------------------------------------------------- the run
def _group(cfg: DictConfig, key: str) -> dict:
    node = cfg.get(key)
    if node is None:
        raise ConfigError(f"no {key} config: choose one with {key}=<option>")
    try:
        return _container(node)
    except Exception as e:  # an interpolation that does not resolve, a missing value
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def _fields(cls, d: dict, group: str, extra: bool = False, strict: bool = False) -> dict:
    """The dataclass's fields out of a config group; a required field the group lacks is named. `extra`: the
    other keys go to the dataclass's `extra`; `strict`: any other key is refused (a group the dataclass covers
    whole, where an unknown key, e.g. a misspelt `+optim.x=...`, would otherwise be recorded but do nothing)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
    known = {k: v for k, v in d.items() if k in fields}
    if extra:
        known["extra"] = {k: v for k, v in d.items() if k not in fields and k != "_target_"}
    elif strict:
        for k, v in d.items():
            if k not in fields:
                _fail(f"{group}.{k}", v, f"not one of the {group} settings ({', '.join(fields)})")
    for name, f in fields.items():
        if name not in known and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{group}.{name}: missing (set it in configs/{group}/ or on the command line)")
    return known


def check_tags(tags: Any, key: str = "tags") -> None:
    """`tags` (train.yaml; the wandb run's tags): null, a word, or a list of words of 1 to 64 characters, wandb's own
    rule. wandb checked them only when the logger was built, after data preparation, and a number in the list
    (tags=[dev,1]) ended the run there with a pydantic traceback."""
    if tags is None:
        return
    for tag in tags if isinstance(tags, (list, tuple)) else [tags]:
        if not isinstance(tag, str) or not 1 <= len(tag) <= 64:
            _fail(key, tags, "a word or a list of words, each 1 to 64 characters (quote a number: '\"1\"')")


def data_settings(cfg: DictConfig) -> DataSettings:
    """cfg.data's sizes and cache dir, checked (training, and eval.py's command line); and every data option
    against TextDataModule's and CorpusSpec's parameters (an unknown `+data.x=1` was a TypeError traceback after the
    run dir existed, `data.pin_memory=maybe` was taken)."""
    settings = DataSettings(**_fields(DataSettings, _group(cfg, "data"), "data"))  # its rules name the sizes
    node = cfg.get("data")
    if isinstance(node, DictConfig):
        check_node_options("data", _resolved_where_possible(node))
    return settings


def check_read_fields(data: dict) -> None:
    """No corpus setting the source would ignore: `data.val_files=x` with the stdlib source validated (and eval.py
    evaluated) on the stdlib split while naming x. Training and eval.py alike."""
    from deepseek_mini.data import unread_fields
    from deepseek_mini.data.corpus import SOURCE_FIELDS

    source = data.get("source", "stdlib")
    if source not in SOURCE_FIELDS:
        _fail("data.source", source, "use stdlib, text or hub")
    for key in unread_fields(data):
        readers = " or ".join(f"data={s}" for s, keys in SOURCE_FIELDS.items() if key in keys)
        _fail(f"data.{key}", data[key], f"the {source} source does not read it (only {readers} does); give "
                                        f"{readers.split(' or ')[0]} with it, or drop it")


def check_data_sources(data: dict) -> None:
    """What training will read, where that needs no reading: a known source, and no setting it would ignore; for
    source=text, train_files given and every file, directory or glob of train_files / val_files there (listed, not
    read); a given tokenizer_path a file; for source=hub, a hub_name. These were DataErrors from data preparation,
    after the run dir existed."""
    from deepseek_mini.data import DataError, expand_files

    check_read_fields(data)
    source = data.get("source", "stdlib")
    if source == "text":
        if not data.get("train_files"):
            _fail("data.train_files", data.get("train_files"), "source=text needs a file, directory, glob or list")
        for key in ("train_files", "val_files"):
            if data.get(key):
                try:
                    expand_files(data[key], key)
                except DataError as e:
                    _fail(f"data.{key}", data[key], str(e))
    if source == "hub" and not data.get("hub_name"):
        _fail("data.hub_name", data.get("hub_name"), "source=hub needs a dataset name (or a local dataset dir)")
    tokenizer = data.get("tokenizer_path")
    if tokenizer and not Path(os.path.expanduser(str(tokenizer))).is_file():
        _fail("data.tokenizer_path", tokenizer, "no such file (a tokenizer.json to use, or null to train one)")


def check_compile(value) -> str | None:
    """`compile` -> its canonical spelling ("regional", "full:reduce-overhead", ...; training/compile.py), or None."""
    from deepseek_mini.training.compile import parse_compile

    try:
        spec = parse_compile(value)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return str(spec) if spec is not None else None


def check_cuda_graphs_accumulation(compile_spec: str | None, accumulate_grad_batches: int) -> None:
    """CUDA graphs (compile=...:reduce-overhead / max-autotune) and gradient accumulation do not mix: the first
    micro-batch's backward leaves each .grad in the graph's own output memory, and the next micro-batch's replay
    overwrites it before autograd can add to it. Seen on an H200 (torch 2.11): the first step fails with
    "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run"."""
    from deepseek_mini.training.compile import parse_compile

    spec = parse_compile(compile_spec) if compile_spec else None
    if spec is not None and spec.cudagraphs and int(accumulate_grad_batches) > 1:
        _fail("trainer.accumulate_grad_batches", accumulate_grad_batches,
              f"gradient accumulation cannot run with CUDA graphs (compile={compile_spec}); use "
              f"compile={spec.scope} (no CUDA graphs), or accumulate_grad_batches=1 with a larger data.batch_size")


def check_cuda_graphs_placement(compile_spec: str | None, strategy: Any = None, world_size: int = 1) -> None:
    """CUDA graphs (compile=...:reduce-overhead / max-autotune) only where a run has shown them right: the whole
    model (compile=full:...), on one GPU, under DDP, or under EP with the padded dispatch (checked in
    training/expert_parallel.py; 0.93x DDP's speed on two H200s, DDP's loss curve); regionally compiled blocks
    under one whole-model graph (compile=regional:..., training/compile.GraphedRegional) on one GPU only.
    On two H200s (torch 2.11, 2026-11-30) DDP with the earlier meaning of compile=regional:reduce-overhead
    (cudagraph trees, one graph per block) ran at 1.4x the speed of compile=regional and trained nothing: the
    gradient norm was inf from step 19 on and the loss stayed near 8.4 (4.7 with compile=regional, same steps),
    while torch warned that the AccumulateGrad node's stream did not match the stream of the graph that produced
    the gradient. The whole model as one graph under DDP (training/compile.OneGraphUnderDDP) trained right there
    (losses on the eager DDP curve, docs/benchmarks.md). No multi-GPU run has tried GraphedRegional, so it is
    refused under any strategy but one process. No run has tried CUDA graphs under FSDP (which gathers each
    block's parameters in hooks around it), so FSDP is refused whatever the number of devices; compile=regional
    is FSDP's measured setting (two H200s, 2026-11-30: 1.73x its eager speed, on the eager loss curve)."""
    from deepseek_mini.training.compile import parse_compile

    spec = parse_compile(compile_spec) if compile_spec else None
    if spec is None or not spec.cudagraphs:
        return
    if _is_fsdp(strategy):
        _fail("compile", compile_spec, "CUDA graphs are refused with FSDP (no run has shown them right there; "
              "docs/benchmarks.md); use compile=regional, FSDP's fastest measured setting, or trainer=ddp")
    name = _strategy_name(strategy)
    one_process = world_size == 1 and (name in ("", "auto") or "single" in name)
    if spec.scope == "regional" and not one_process:
        _fail("compile", compile_spec, "regionally compiled blocks under whole-model CUDA graphs run on one GPU "
              "only (no multi-GPU run has shown them right); use compile=full:reduce-overhead (DDP, EP) or "
              "compile=regional")


@dataclass(frozen=True)
class RunConfig:
    """Everything train() runs with, checked together."""

    model: ModelConfig
    optim: OptimConfig
    scheduler: SchedulerConfig
    trainer: TrainerSettings
    data: DataSettings
    output_dir: Path
    seed: int = 1234
    compile: str | None = None
    ckpt_path: str | None = None
    resume: bool = False
    val_before_fit: bool = True
    cpu_threads: int | str = "auto"  # training/threads.py: auto or a positive integer

    def __post_init__(self):
        from deepseek_mini.training.threads import resolve_cpu_threads

        as_seed(self.seed)
        resolve_cpu_threads(self.cpu_threads)  # its rule, here so that a bad value stops before any write
        writable_dir("hydra.run.dir", self.output_dir)
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                              f"{self.model.max_position_embeddings}: lower data.seq_len or raise the model's")
        if self.compile and not self.trainer.on_gpu:
            from deepseek_mini.training.compile import cpu_compile_problem

            if (problem := cpu_compile_problem()) is not None:
                _fail("compile", self.compile, problem)
        if self.trainer.on_gpu:  # CUDA graphs exist only there
            check_cuda_graphs_accumulation(self.compile, self.trainer.accumulate_grad_batches)
            check_cuda_graphs_placement(self.compile, self.trainer.extra.get("strategy"), self.trainer.world_size)
        if self.data.seq_len <= self.model.num_nextn_predict_layers:  # MTP depth k needs k + 1 tokens ahead
            raise ConfigError(f"model.num_nextn_predict_layers={self.model.num_nextn_predict_layers}: must be < "
                              f"data.seq_len={self.data.seq_len} (each MTP depth predicts one token further ahead)")
        strategy = self.trainer.extra.get("strategy")
        shards = self.trainer.devices if _is_fsdp(strategy) and isinstance(self.trainer.devices, int) else 1
        if "expert_parallel" in str(strategy or ""):  # trainer=ep: checked in training/expert_parallel.py
            from deepseek_mini.training.expert_parallel import check_expert_parallel

            shards = check_expert_parallel(self.model, self.trainer.extra["strategy"], self.trainer.devices,
                                           self.trainer.num_nodes, self.compile, self.trainer.precision)
        check_fits_in_memory(self.model, shards)

    @property
    def wants_resume(self) -> bool:
        return self.resume or self.ckpt_path is not None

    @classmethod
    def from_cfg(cls, cfg: DictConfig, output_dir: str | os.PathLike) -> RunConfig:
        as_seed(cfg.get("seed", 1234))  # first: data.seed follows it (${seed})
        model = model_config_from(cfg)
        optim = OptimConfig(**_fields(OptimConfig, _group(cfg, "optim"), "optim", strict=True))
        scheduler = SchedulerConfig(**_fields(SchedulerConfig, _group(cfg, "scheduler"), "scheduler", strict=True))
        trainer = TrainerSettings(**_fields(TrainerSettings, _group(cfg, "trainer"), "trainer", extra=True))
        data = data_settings(cfg)
        check_data_sources(_container(cfg.get("data")) or {})
        compile_spec = check_compile(cfg.get("compile", False))
        check_tags(_container(cfg.get("tags")))
        check_instantiated_options(cfg, model)
        ckpt = cfg.get("ckpt_path")
        ckpt = None if ckpt in (None, "", "null") else str(ckpt)
        return cls(model=model, optim=optim, scheduler=scheduler, trainer=trainer, data=data,
                   output_dir=Path(str(output_dir)), seed=cfg.get("seed", 1234), compile=compile_spec, ckpt_path=ckpt,
                   resume=as_bool("resume", cfg.get("resume", False)),
                   val_before_fit=as_bool("val_before_fit", cfg.get("val_before_fit", True)),
                   cpu_threads=cfg.get("cpu_threads", "auto"))

    def summary(self, data_source: str | None = None) -> str:
        """One line a person reads at the start of a run: what is about to train, on what, for how long."""
        m, t = self.model, self.trainer
        shape = f"{m.attention}, d={m.hidden_size}, {m.num_hidden_layers} layers"
        if m.is_moe:
            shape += f", {m.n_routed_experts} routed experts top-{m.num_experts_per_tok} + {m.n_shared_experts} shared"
        if m.attention == "mla":
            shape += f", kv_lora_rank {m.kv_lora_rank}"
        source = f"{data_source} " if data_source else ""
        return (f"config: model ({shape}); data {source}seq_len {self.data.seq_len} x batch {self.data.batch_size}; "
                f"{t.max_steps} steps, lr {self.optim.lr:g} {self.scheduler.name} (warmup {self.scheduler.warmup_steps}); "
                f"precision {t.precision}, compile {self.compile or 'off'}, seed {self.seed}")

    def optim_dict(self) -> dict:
        d = asdict(self.optim)
        d["betas"] = list(self.optim.betas)
        return d

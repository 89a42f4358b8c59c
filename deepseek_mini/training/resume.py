"""Resume: which checkpoint, whether the run can really continue from it, and the state it carries.

* `resolve_ckpt_path` / `latest_run_with_checkpoint`: `ckpt_path=last` / `resume=true` means
  `<run dir>/checkpoints/last.ckpt`; without `hydra.run.dir=` the latest run that has one. The file is checked
  (zip + CRC) and so is what it holds (`verify_training_checkpoint`: a Lightning training checkpoint, a valid
  recorded model config, weights of that config's shapes, floating point and finite).
* `check_max_steps`: a `trainer.max_steps` below the checkpoint's step is refused (nothing could be trained).
* `resume_overrides`: compares what the command will run with what the checkpoint's run ran (the
  checkpoint's `model_config` hyper-parameters, `checkpoints/config.yaml`). A model or data field the user
  did not ask to change is taken from the run (returned as `++key=value` overrides); one the user did ask
  to change refuses the resume with one line naming the fields. `reliability.cli_entry` runs this before
  Hydra writes anything into the run dir.
* `check_world_size`: a sharded FSDP checkpoint (a `last.ckpt/` directory) resumes only with the number of
  ranks that wrote it (refused in one line naming trainer.devices); a full checkpoint resumes on any number
  (the data stream continues at the recorded sample; the global batch changes, and a warning says so).
* `check_tokenizer`: after data preparation, the tokenizer must be the one the checkpoint was trained with.
* `RNGStateCallback`: torch / numpy / python (and CUDA) RNG states in the checkpoint (Lightning does not
  restore them), stored as tensors and plain containers so `weights_only` loading still works.
* `RunHistory`: val_loss_start and the validation history, kept in the checkpoint so results.json is
  cumulative over any number of resumes.
* `ResumeSchedule`: the learning-rate schedule on resume: a changed `optim.lr` applies from the resume
  step, and a longer `trainer.max_steps` stretches the schedule's tail from the resume point (module.lr_lambda).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import random
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from deepseek_mini.checkpoint import (
    CheckpointError,
    check_checkpoint_file,
    check_sharded_checkpoint,
    checkpoint_model_config,
    consolidate_command,
    is_sharded_checkpoint,
    read_data_record,
    verify_weights,
)
from deepseek_mini.config import ConfigError
from deepseek_mini.training.checkpoint_io import read_checkpoint_meta

log = logging.getLogger(__name__)

# the data settings that decide which tokens the model sees (batch_size is a training setting: the stream
# continues at the same sample whatever the new batch size)
DATA_IDENTITY = ("source", "train_files", "val_files", "hub_name", "hub_config", "hub_split", "hub_val_split",
                 "text_field", "vocab_size", "tokenizer_path", "seq_len", "val_fraction", "max_chars", "seed")


# ---------------------------------------------------------------------- which checkpoint
def resolve_ckpt_path(ckpt_path: Any, output_dir: Path, resume: bool = False,
                      sweep_job: bool = False) -> Path | None:
    """cfg.ckpt_path (`null`, `last` or a file) -> a checked checkpoint file in this run, or None.

    `last` (or resume=true) means `<output dir>/checkpoints/last.ckpt`, a file, or under trainer=fsdp a sharded
    checkpoint directory (checked shard by shard). Without `hydra.run.dir=`,
    `cli_entry` has already pointed the output dir at the latest run that has one. In a resumed sweep
    (`sweep_job`) a job dir without last.ckpt that holds no run (the job never started, or failed before its
    first checkpoint) starts its job from step 0: resuming a sweep finishes what is left of it.
    """
    if ckpt_path in (None, "", "null"):
        if not resume:
            return None
        ckpt_path = "last"
    if str(ckpt_path) == "last":
        path = Path(output_dir).expanduser() / "checkpoints" / "last.ckpt"
        if not path.exists():
            if sweep_job and not holds_a_run(Path(output_dir)):
                return None
            if sweep_job:  # hydra.run.dir= would take the job out of its sweep
                raise CheckpointError(f"ckpt_path=last: no checkpoint {path}, so its run cannot train on (its "
                                      "results.json is kept while trainer.max_steps is the step it completed); "
                                      "train further in a new hydra.sweep.dir")
            raise CheckpointError(f"ckpt_path=last: no checkpoint {path}; resume with hydra.run.dir=<run dir> "
                                  "ckpt_path=last, or give ckpt_path=<file>")
    else:
        path = Path(str(ckpt_path)).expanduser().resolve()
    # trainer=fsdp writes last.ckpt as a directory of shards (+ meta.pt): train resumes from it as it is
    if is_sharded_checkpoint(path):
        check_sharded_checkpoint(path)
        verify_training_checkpoint(path)
    elif (identity := _identity(path)) is None or identity not in _VERIFIED:
        check_checkpoint_file(path)  # a missing file or a directory is refused here, before any identity is kept
        verify_training_checkpoint(path)
        _VERIFIED.add(identity)
    return path


# Files checked in this process, by (path, inode, size, mtime, ctime): cli_entry's check before Hydra and train()
# resolve the same checkpoint, and the CRC of every member and the finite-weights scan read all of it each time.
_VERIFIED: set[tuple] = set()


def _identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) if path.is_file() else None


def verify_training_checkpoint(path: Path) -> None:
    """What Lightning will restore, checked before anything is written (Lightning itself would fail with a
    traceback after data preparation, with the run dir already rewritten): a training checkpoint of Lightning's
    (its version, step and optimizer state: a best-step file written with best_weights_only cannot continue a
    run), its recorded model config valid, and its weights of that config's shapes, floating point and finite.
    A sharded directory's weights are in its shards (check_sharded_checkpoint checked their sizes)."""
    meta = read_checkpoint_meta(path)
    why = f"cannot resume from {path}"
    for key in ("pytorch-lightning_version", "global_step"):
        if key not in meta:
            raise CheckpointError(f"{why}: not a Lightning training checkpoint (no {key})")
    config = checkpoint_model_config(meta, path)
    if is_sharded_checkpoint(path):
        return
    if not meta.get("optimizer_states"):
        raise CheckpointError(f"{why}: it holds the weights only (a best-step file written with best_weights_only); "
                              "resume from the run's last.ckpt, or evaluate this file with eval.py")
    state = meta.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{why}: not a Lightning checkpoint (no state_dict of tensors)")
    foreign = sorted(k for k in state if not k.startswith("model."))
    if foreign:  # LitDeepSeek holds the model only: Lightning's strict load would fail on these after data prep
        raise CheckpointError(f"{why}: its state_dict holds keys that are not the model's: {foreign[:5]}"
                              f"{' ...' if len(foreign) > 5 else ''}")
    if config is not None:
        verify_weights(config, state, path)


def holds_a_run(run_dir: Path) -> bool:
    """A run that trained: checkpoints/last.ckpt, or a results.json that is not a failure's or an interrupt's (a
    run that failed or was stopped before its first checkpoint may be started again in its dir)."""
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        return True
    if not (run_dir / "results.json").is_file():
        return False
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status") not in ("failed", "interrupted")
    except Exception:  # unreadable: not ours to replace
        return True


def finished_results(run_dir: Path, step: int | None) -> dict | None:
    """results.json of a run that completed at `step`, or None: a resume with trainer.max_steps equal to that step
    has nothing to train, and (a resumed sweep re-running its finished jobs) must leave those records as they are."""
    try:
        res = json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(res, dict) and res.get("status") == "completed" and res.get("global_step") == step
    return res if ok and step is not None else None


def finished_without_checkpoint(run_dir: Path, ckpt_path: Any, resume: bool, max_steps: int | None) -> dict | None:
    """results.json of a run that completed at `max_steps` and whose checkpoints were deleted since (disk freed
    after a sweep), when the command resumes it (ckpt_path=last or resume=true), else None: there is nothing to
    train, and no checkpoint is needed to say so. With last.ckpt present, train() compares its step instead."""
    last = str(ckpt_path) == "last" or (resume and ckpt_path in (None, "", "null"))
    if not last or (Path(run_dir) / "checkpoints" / "last.ckpt").exists():
        return None
    return finished_results(run_dir, max_steps)


def latest_run_with_checkpoint(runs_dir: Path) -> Path | None:
    """The most recently written run dir under `runs_dir` that has checkpoints/last.ckpt."""
    found = [Path(p).parent.parent for p in glob.glob(str(runs_dir / "*" / "checkpoints" / "last.ckpt"))]
    return max(found, key=lambda d: (d / "checkpoints" / "last.ckpt").stat().st_mtime) if found else None


# ---------------------------------------------------------------------- can it continue?
def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _override_value(v: Any) -> str:
    """A value in Hydra's override grammar."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_override_value(x)}" for k, x in v.items()) + "}"
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _asked(overrides: list[str], group: str, key: str) -> bool:
    """Did the command line ask for this field (directly, through its group, or through an experiment)?"""
    for o in overrides:
        name = o.split("=", 1)[0].lstrip("+~")
        if name in (f"{group}.{key}", group, "experiment") or name == "sizing" or name.startswith("sizing."):
            return True
        if group == "data" and key == "vocab_size" and name == "model.vocab_size":
            return True  # data.vocab_size follows model.vocab_size
        if group == "data" and key == "seed" and name == "seed":
            return True
    return False


def resume_overrides(cfg, ckpt_file: Path, overrides: list[str]) -> list[str]:
    """Overrides that make this command run the checkpoint's model and data, or ConfigError naming the fields
    the command asks to change (a resume continues the same model on the same tokens)."""
    import yaml

    from deepseek_mini.training.run_config import model_config_from

    meta = read_checkpoint_meta(ckpt_file)
    recorded_model = (meta.get("hyper_parameters") or {}).get("model_config")  # a valid one: resolve_ckpt_path
    config_yaml = ckpt_file.parent / "config.yaml"
    try:
        recorded = yaml.safe_load(config_yaml.read_text()) if config_yaml.is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read {config_yaml} (the run's recorded config): {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(recorded, dict):
        raise CheckpointError(f"cannot read {config_yaml} (the run's recorded config): not a mapping")
    check_max_steps((cfg.get("trainer") or {}).get("max_steps"), meta, ckpt_file)
    pairs: list[tuple[str, str, Any, Any]] = []  # (group, key, recorded, now)
    if recorded_model:
        now = _norm(model_config_from(cfg).to_dict())
        for k, v in _norm(recorded_model).items():
            if k != "vocab_size" and now.get(k) != v:  # vocab_size: the tokenizer's size, checked as data.vocab_size
                pairs.append(("model", k, v, now.get(k)))
    rec_data = (recorded or {}).get("data") or {}
    if rec_data:
        from omegaconf import OmegaConf

        now = _norm(OmegaConf.to_container(cfg.data, resolve=True))
        for k in DATA_IDENTITY:
            if k in rec_data and _norm(rec_data[k]) != now.get(k):
                pairs.append(("data", k, _norm(rec_data[k]), now.get(k)))
    check_world_size(cfg, ckpt_file, meta, recorded)
    differ = [(g, k, r, n) for g, k, r, n in pairs if _asked(overrides, g, k)]
    if differ:
        fields = ", ".join(f"{g}.{k}={n!r} (the run: {r!r})" for g, k, r, n in differ)
        raise ConfigError(f"ckpt_path={ckpt_file}: cannot resume with a different model or data: {fields}; "
                          "drop those overrides to continue the run, or start a new run without ckpt_path")
    adopt = [f"++{g}.{k}={_override_value(r)}" for g, k, r, _ in pairs]
    if recorded_model and any(g == "data" and k == "vocab_size" for g, k, _, _ in pairs):
        adopt.append(f"++model.vocab_size={int(recorded_model['vocab_size'])}")
    adopt += validation_overrides(cfg, recorded, recorded_world_size(meta, recorded), overrides, ckpt_file)
    if adopt:
        log.info("resume: using the run's recorded settings %s", " ".join(adopt))
    return adopt


def _validated(limit: Any, batch: int, world: int) -> tuple:
    """Which validation windows val/loss is measured on, from trainer.limit_val_batches, the validation batch size
    and the ranks (each rank takes its batches from its own rank-strided share, in order): a count of batches is
    the first limit x batch x world windows; all of them (1.0 or null) whatever the batch size; a fraction
    depends on all three."""
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return ("all",)
    if isinstance(limit, int):
        return ("first", limit * batch * world)
    return ("fraction", limit, batch, world)


def _describe(v: tuple) -> str:
    return {"all": lambda: "every validation window", "first": lambda: f"the first {v[1]} validation windows",
            "fraction": lambda: f"a fraction {v[1]} of the validation batches ({v[2]} windows each, "
                                f"{v[3]} rank(s))"}[v[0]]()


def validation_overrides(cfg, recorded: dict, recorded_world: int | None, overrides: list[str],
                         ckpt_file: Path) -> list[str]:
    """Overrides that keep a resumed run validating on the windows its earlier validations measured, so that
    val/loss, best-step and results.json's val_history compare like with like across the resume.

    A new data.batch_size (validation batches are that long unless data.val_batch_size is set), another
    trainer.limit_val_batches from a changed config, or another number of ranks would each change how many
    windows a validation covers. The run's windows are kept by adopting values of trainer.limit_val_batches and
    data.val_batch_size, keeping the ones the command sets itself (the run's own printed resume command repeats
    its overrides); a command whose own values cannot cover those windows is refused (eval.py measures a checkpoint
    on any windows). When no values reproduce the windows (a count of batches not divisible over the new ranks, a
    fraction on another world size), the resume goes on and says so."""
    from omegaconf import OmegaConf

    rec_trainer, rec_data = (recorded.get("trainer") or {}), (recorded.get("data") or {})
    if "limit_val_batches" not in rec_trainer or not rec_data.get("batch_size"):
        return []  # a record from before these settings were kept
    now_data = OmegaConf.to_container(cfg.data, resolve=True)
    rec_limit, now_limit = rec_trainer["limit_val_batches"], cfg.trainer.get("limit_val_batches")
    rec_batch = int(rec_data.get("val_batch_size") or rec_data["batch_size"])
    now_batch = int(now_data.get("val_batch_size") or now_data["batch_size"])
    node = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
            for k in ("devices", "num_nodes", "accelerator") if (v := cfg.trainer.get(k)) is not None}
    rec_world = recorded_world or 1
    now_world = requested_world_size(node) or rec_world
    before, after = _validated(rec_limit, rec_batch, rec_world), _validated(now_limit, now_batch, now_world)
    try:  # a count of windows at or past all there are is all of them (the data record has how many)
        n = (read_data_record(ckpt_file) or {}).get("val_windows")
    except CheckpointError:  # a damaged record: eval.py names it; here the windows are compared as counted
        n = None
    if isinstance(n, int) and not isinstance(n, bool):
        before, after = (("all",) if v[0] == "first" and v[1] >= n else v for v in (before, after))
    if before == after or before in (("first", 0), ("fraction", 0.0, rec_batch, rec_world)):
        return []  # the same windows, or the run never validated: nothing to compare with
    given = {k: v for k, v in (("trainer.limit_val_batches", now_limit), ("data.val_batch_size", now_batch))
             if any(o.split("=", 1)[0].lstrip("+~") == k for o in overrides)}
    found = _reproduce(before, now_world, rec_world, now_limit, now_batch, rec_limit, rec_batch, given)
    if found is not None and all(v == found[0 if k.startswith("trainer") else 1] for k, v in given.items()):
        limit, batch = found
        adopt = [f"++trainer.limit_val_batches={_override_value(limit)}"] if limit != now_limit else []
        return adopt + ([f"++data.val_batch_size={batch}"] if batch != now_batch else [])
    if given:  # the command's own values: no run windows with them
        named = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ConfigError(f"{named}: the run's validations measured val/loss on {_describe(before)}, this resume "
                          f"would measure it on {_describe(after)}, and the two would not compare; drop "
                          f"{' and '.join(given)} to continue the run (eval.py ckpt_path={ckpt_file} "
                          "limit_batches=<n> measures it on other windows)")
    print(f"warning: resume on {now_world} rank(s): the run's validations measured val/loss on {_describe(before)}, "
          "and no trainer.limit_val_batches / data.val_batch_size reproduces that here; from this resume val/loss "
          f"is measured on {_describe(after)}", file=sys.stderr)
    return []


def _reproduce(before: tuple, world: int, rec_world: int, now_limit: Any, now_batch: int, rec_limit: Any,
               rec_batch: int, given: dict) -> tuple[Any, int] | None:
    """(trainer.limit_val_batches, validation batch size) that validate on the windows `before` names with
    `world` ranks, keeping what the command gave where it can; None when none do."""
    if before[0] == "all":  # null: every window, whatever the batch
        return (rec_limit if rec_limit is None or isinstance(rec_limit, float) else None), now_batch
    if before[0] == "fraction":
        return (rec_limit, rec_batch) if world == rec_world else None
    per_rank, left = divmod(before[1], world)
    if left:
        return None
    if "data.val_batch_size" in given:
        batch = now_batch
    elif "trainer.limit_val_batches" in given:  # the command's count: the batch that makes it cover them
        ok = isinstance(now_limit, int) and not isinstance(now_limit, bool) and now_limit > 0
        batch = per_rank // now_limit if ok and per_rank % now_limit == 0 else 0
    else:  # the new batch size where it divides (a smaller batch may be why it changed), else the run's
        batch = now_batch if per_rank % now_batch == 0 else math.gcd(per_rank, rec_batch)
    return (per_rank // batch, batch) if batch and per_rank % batch == 0 else None


def check_max_steps(max_steps: Any, meta: dict, ckpt_file: Path) -> None:
    """A resume whose trainer.max_steps is below the checkpoint's step could train nothing, yet Lightning would
    rewrite last.ckpt and the run's records: refused (max_steps equal to the step is a finished run re-reported)."""
    step = meta.get("global_step")
    if isinstance(step, int) and isinstance(max_steps, int) and not isinstance(max_steps, bool) \
            and 0 <= max_steps < step:
        raise ConfigError(f"trainer.max_steps={max_steps}: below the step of {ckpt_file} ({step}), so there is "
                          f"nothing to train; give trainer.max_steps > {step} to continue the run")


def requested_world_size(trainer_cfg: dict) -> int | None:
    """Ranks the command will run (devices x num_nodes; devices=auto on the CPU is one process), or None where it is
    not known before start-up."""
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1) or 1
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        n = devices
    elif devices in ("auto", -1, "-1") and str(trainer_cfg.get("accelerator", "auto")).lower() != "cpu" \
            and torch.cuda.is_available():
        n = torch.cuda.device_count()
    elif devices == "auto":  # Lightning's CPU accelerator: one process
        n = 1
    else:
        return None
    return n * int(nodes) if isinstance(nodes, int) else None


def recorded_world_size(meta: dict, recorded_config: dict | None) -> int | None:
    """The world size the checkpoint was written with: RunHistory's record, else the run's config.yaml."""
    state = (meta.get("callbacks") or {}).get("RunHistory") or {}
    if isinstance(state.get("world_size"), int):
        return state["world_size"]
    trainer_cfg = ((recorded_config or {}).get("trainer")) or {}
    if not isinstance(trainer_cfg.get("devices"), (int, list)):  # auto / -1 meant that machine's devices
        return None
    return requested_world_size(trainer_cfg)


def check_world_size(cfg, ckpt_file: Path, meta: dict, recorded_config: dict | None) -> None:
    """A sharded FSDP checkpoint resumes only under trainer=fsdp, on the world size that wrote it; a full
    checkpoint (DDP, one device) on any, with a warning: the data stream continues at the recorded sample
    (`samples_seen`), but every optimizer step from here on sees a different global batch."""
    from omegaconf import OmegaConf

    from deepseek_mini.training.run_config import _is_fsdp

    node = cfg.get("trainer") or {}
    trainer_cfg = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
                   for k in ("devices", "num_nodes", "accelerator", "strategy") if (v := node.get(k)) is not None}
    sharded = is_sharded_checkpoint(ckpt_file)
    old, new = recorded_world_size(meta, recorded_config), requested_world_size(trainer_cfg)
    devices = trainer_cfg.get("devices")
    if sharded and old is not None and new is not None and old != new:
        nodes = trainer_cfg.get("num_nodes", 1)
        per_node = f"trainer.devices={old // nodes}" if isinstance(nodes, int) and nodes and old % nodes == 0 \
            else f"devices x num_nodes = {old}"
        raise ConfigError(f"trainer.devices={devices!r}: the sharded FSDP checkpoint {ckpt_file} was written by "
                          f"{old} ranks and this run would have {new}; resume it with {per_node}, or start a new "
                          f"run from its consolidated weights (`{consolidate_command(ckpt_file)}`)")
    if sharded and not _is_fsdp(trainer_cfg.get("strategy")):
        raise ConfigError(f"ckpt_path={ckpt_file}: a sharded FSDP checkpoint resumes only with trainer=fsdp (this "
                          "run has no FSDP strategy); add trainer=fsdp, or evaluate it after "
                          f"`{consolidate_command(ckpt_file)}`")
    if old is not None and new is not None and old != new:
        log.warning("resume: world size %d -> %d (trainer.devices=%s): the data stream continues at the recorded "
                    "sample, each optimizer step now sees data.batch_size x %d x accumulate_grad_batches sequences",
                    old, new, devices, new)


def check_tokenizer(tokenizer_path: str | None, ckpt_meta: dict, ckpt_path: Path) -> None:
    """The tokenizer this resume built must be the checkpoint's (token ids must mean the same)."""
    from deepseek_mini.data.tokenizer import file_sha256

    state = next((v for k, v in ckpt_meta.items() if k.endswith("TextDataModule") and isinstance(v, dict)), {})
    sha = state.get("tokenizer_sha")
    if sha and tokenizer_path and sha != file_sha256(tokenizer_path):
        raise ConfigError(f"ckpt_path={ckpt_path}: the tokenizer {tokenizer_path} differs from the one the "
                          f"checkpoint was trained with ({state.get('tokenizer_path')}); resume with the run's data "
                          "settings, or start a new run")


# ---------------------------------------------------------------------- state in the checkpoint
class RNGStateCallback(L.Callback):
    """Saves and restores the torch, CUDA, numpy and python RNG states with the checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss": gauss},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "torch" in state:
            torch.set_rng_state(state["torch"].cpu())
        if "numpy" in state:
            s = state["numpy"]
            np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                                 s["cached_gaussian"]))
        if "python" in state:
            s = state["python"]
            random.setstate((s["version"], tuple(s["internal"]), s["gauss"]))
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.cpu() for t in cuda])
        log.info("restored RNG states from the checkpoint")


class RunHistory(L.Callback):
    """val_loss_start and the validation history (step, loss) of the whole run, across resumes; and the target
    tokens the last validation counted, so that a resumed run whose validation covers other windows says so at
    its first validation (cli_entry's validation_overrides keeps them the same where it can)."""

    def __init__(self):
        self.val_loss_start: float | None = None
        self._module = None
        self._loaded: list[tuple[int, float]] = []
        self._val_tokens: int | None = None

    def setup(self, trainer, pl_module, stage):
        self._module = pl_module

    def state_dict(self) -> dict[str, Any]:
        history = list(getattr(self._module, "val_history", []) or [])
        trainer = getattr(self._module, "_trainer", None)
        return {"val_loss_start": self.val_loss_start, "val_history": [[int(s), float(v)] for s, v in history],
                "val_tokens": int(getattr(self._module, "val_tokens", 0) or 0) or None,
                # the ranks that trained up to here: a sharded checkpoint resumes only on as many (check_world_size)
                "world_size": int(trainer.world_size) if trainer is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.val_loss_start = state.get("val_loss_start", self.val_loss_start)
        self._loaded = [(int(s), float(v)) for s, v in state.get("val_history", [])]
        self._val_tokens = state.get("val_tokens")

    def on_validation_end(self, trainer, pl_module):
        before, self._val_tokens = self._val_tokens, None  # the first validation since the resume
        now = getattr(pl_module, "val_tokens", None)
        if before and now and now != before and not trainer.sanity_checking:
            log.warning("validation at step %d measured val/loss on %d target tokens, the run's validations before "
                        "the resume on %d: the two parts of val_history do not compare", trainer.global_step, now,
                        before)

    def on_train_start(self, trainer, pl_module):
        self.merge_into(pl_module, trainer.global_step)

    def merge_into(self, pl_module, step: int) -> None:
        """The resumed run's earlier validations (up to `step`), before any new one. At train start; and from
        train.finish, because a resume of a finished run (max_steps reached) skips the fit loop and with it
        on_train_start: its history would have been replaced by the one final validation."""
        if self._loaded:
            earlier = [e for e in self._loaded if e[0] <= step]
            pl_module.val_history[:0] = [e for e in earlier if e not in pl_module.val_history]
            self._loaded = []


class ResumeSchedule(L.Callback):
    """The learning-rate schedule across a resume.

    Lightning restores the optimizer's lr and the scheduler's base lr from the checkpoint, and the schedule
    function is rebuilt from the new trainer.max_steps: a new optim.lr would be ignored while the recorded
    config names it, and a longer max_steps would jump the lr up the re-stretched cosine. Here a changed
    optim.lr applies from the resume step, and a changed max_steps is anchored at the resume point
    (`lr_lambda(..., anchor=(step, multiplier))`: the tail continues from the current lr down to min_lr).
    """

    def __init__(self, lr: float, schedule: dict):
        self.lr, self.schedule = float(lr), dict(schedule)
        self.max_steps: int | None = None
        self.anchor: list | None = None
        self._loaded: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"max_steps": self.max_steps, "anchor": self.anchor, "lr": self.lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = dict(state)

    def on_train_start(self, trainer, pl_module):
        from deepseek_mini.optim.schedule import lr_lambda

        self.max_steps = int(trainer.max_steps)
        if self._loaded is None:
            return
        old, self._loaded = self._loaded, None
        step, old_steps = int(trainer.global_step), int(old.get("max_steps") or self.max_steps)
        self.anchor = old.get("anchor")
        if old_steps != self.max_steps:
            m0 = lr_lambda(self.schedule, old_steps, anchor=self.anchor)(step)
            self.anchor = [step, float(m0)]
            log.warning("trainer.max_steps %d -> %d at step %d: the schedule continues from lr x %.4g (%s)",
                        old_steps, self.max_steps, step, m0, self.schedule.get("name"))
        if float(old.get("lr") or self.lr) != self.lr:
            log.warning("optim.lr %g -> %g: the new lr applies from step %d", float(old["lr"]), self.lr, step)
        fn = lr_lambda(self.schedule, self.max_steps, anchor=self.anchor)
        for cfg in trainer.lr_scheduler_configs:
            sched = cfg.scheduler
            if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                continue
            groups = sched.optimizer.param_groups
            sched.lr_lambdas = [fn] * len(groups)
            sched.base_lrs = [self.lr] * len(groups)
            for g in groups:
                g["initial_lr"] = self.lr
                g["lr"] = self.lr * fn(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in groups]

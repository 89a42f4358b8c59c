"""Multi-device training on CPU: `trainer=ddp` with 2 gloo processes, through train.py as a user runs it.

The ranks must end with bit-identical weights *and* router biases (aux-loss-free balancing with
bias_update_speed > 0: each rank sees different data, so the biases stay equal only because the expert
counts are all-reduced; DDP's per-forward buffer broadcast is off in configs/trainer/ddp.yaml), and a DDP
run must resume from its checkpoint. FSDP needs GPUs (Lightning and torch both refuse a CPU device), so
here it is checked as configuration only.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, TINY_OVERRIDES, run_cli, run_config_of
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deepseek_mini.training.strategies import build_trainer_nodes, global_batch, is_sharded_checkpoint

DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv",
           "model.bias_update_speed=0.01", "callbacks.samples.max_new_tokens=4"]
DUMP = "+callbacks.dump_weights._target_=deepseek_mini.training.strategies.DumpWeights"
SEQ_LEN, BATCH = 32, 4  # from TINY_OVERRIDES


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _ranks_agree(dump_dir: Path) -> dict:
    r0 = torch.load(dump_dir / "rank0.pt", weights_only=True)
    r1 = torch.load(dump_dir / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    differ = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert not differ, f"ranks diverged: {differ[:5]}"
    return r0


# ---------------------------------------------------------------------- arithmetic and configs
def test_global_batch_arithmetic():
    assert global_batch(4, 32) == {"per_device_batch_size": 4, "world_size": 1, "accumulate_grad_batches": 1,
                                   "global_batch_size": 4, "global_batch_tokens": 128}
    b = global_batch(16, 1024, world_size=8, accumulate_grad_batches=4)
    assert b["global_batch_size"] == 16 * 8 * 4 and b["global_batch_tokens"] == 16 * 8 * 4 * 1024
    with pytest.raises(ValueError):
        global_batch(4, 32, world_size=0)


def test_a_run_ends_by_freeing_cuda_graphs_then_destroying_the_process_group(tmp_path, monkeypatch):
    """release_process_group (train()'s last step): a live CUDA graph holding NCCL collectives made a GPU run hang
    at exit, so the compiled state (its CUDA-graph trees) goes first, then the group; without a group, nothing."""
    import torch.distributed as dist

    from deepseek_mini.training.strategies import release_process_group

    calls = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: calls.append(dist.is_initialized()))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        release_process_group()
        assert calls == [True] and not dist.is_initialized()
        release_process_group()
        assert calls == [True]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_config_builds_a_ddp_strategy():
    from lightning.pytorch.strategies import DDPStrategy

    cfg = _compose("trainer=ddp")
    assert cfg.trainer.use_distributed_sampler is False and cfg.trainer.devices == 2
    kwargs = build_trainer_nodes({"strategy": OmegaConf.to_container(cfg.trainer.strategy, resolve=True)})
    strategy = kwargs["strategy"]
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs["find_unused_parameters"] is False
    assert strategy._ddp_kwargs["gradient_as_bucket_view"] is True
    # any Trainer argument given as a node is built, not passed on as a dict (a profiler node used to reach
    # Lightning as a dict: AttributeError "'dict' object has no attribute 'profile'" after data preparation)
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.profilers import SimpleProfiler

    built = build_trainer_nodes({"profiler": {"_target_": "lightning.pytorch.profilers.SimpleProfiler"}, "max_steps": 3,
                                 "plugins": [{"_target_": "lightning.pytorch.plugins.io.TorchCheckpointIO"}, "x"]})
    assert isinstance(built["profiler"], SimpleProfiler) and built["max_steps"] == 3
    assert isinstance(built["plugins"][0], TorchCheckpointIO) and built["plugins"][1] == "x"
    # broadcast_buffers, the name every torch 2.x DDP takes (forward_sync_buffers exists only from 2.13 on:
    # torch 2.11 on the GPU machine refused it)
    assert strategy._ddp_kwargs["broadcast_buffers"] is False and "forward_sync_buffers" not in strategy._ddp_kwargs


def test_fsdp_config_wraps_each_block_and_keeps_buffers_fp32():
    from lightning.pytorch.strategies import FSDPStrategy

    from deepseek_mini.model.transformer import Block

    cfg = _compose("trainer=fsdp")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.use_distributed_sampler is False
    assert cfg.get("compile") is False, "torch.compile stays off by default (not combined with FSDP)"
    strategy = build_trainer_nodes({"strategy": OmegaConf.to_container(cfg.trainer.strategy, resolve=True)})["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy.sharding_strategy.name == "FULL_SHARD" and strategy._state_dict_type == "sharded"
    mp = strategy.mixed_precision
    assert mp.param_dtype == torch.bfloat16 and mp.buffer_dtype == torch.float32 and mp.reduce_dtype == torch.float32
    assert not is_sharded_checkpoint(CONFIGS)


def test_fsdp_keeps_buffers_fp32_whatever_param_dtype():
    """param_dtype=null used to pass no MixedPrecision, so Lightning's bf16-mixed plugin made every buffer (router
    counts and biases) bf16; now the strategy always carries buffer_dtype=float32, and bf16 buffers are refused."""
    from deepseek_mini.config import ConfigError
    from deepseek_mini.training.run_config import check_multi_device
    from deepseek_mini.training.strategies import fsdp_strategy

    strategy = fsdp_strategy(param_dtype=None)
    assert strategy.mixed_precision_config.buffer_dtype == torch.float32
    assert strategy.mixed_precision_config.param_dtype is None  # fp32 parameters; autocast lowers the matmuls
    with pytest.raises(ValueError, match="buffer_dtype='bfloat16'"):
        fsdp_strategy(buffer_dtype="bfloat16")
    node = {"_target_": "deepseek_mini.training.strategies.fsdp_strategy", "buffer_dtype": "bfloat16"}
    with pytest.raises(ConfigError, match=r"^trainer.strategy.buffer_dtype='bfloat16': the router's expert counts"):
        check_multi_device("gpu", 2, node)


# ---------------------------------------------------------------------- DDP on CPU, end to end
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cache_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    run_cli("train.py", *TINY_OVERRIDES, *DDP_CPU, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}",
            DUMP, f"+callbacks.dump_weights.dirpath={run_dir / 'dump'}")
    return run_dir


def test_ddp_two_processes_keep_identical_weights_and_biases(ddp_run):
    state = _ranks_agree(ddp_run / "dump")
    assert int(state["__global_step__"]) == 4
    biases = [v for k, v in state.items() if k.endswith("e_score_correction_bias")]
    assert biases and any(b.abs().sum() > 0 for b in biases), "the bias update ran"


def test_ddp_results_batch_arithmetic_and_synced_metrics(ddp_run):
    res = json.loads((ddp_run / "results.json").read_text())
    assert res["world_size"] == 2 and res["global_step"] == 4
    assert res["global_batch_size"] == BATCH * 2 and res["global_batch_tokens"] == BATCH * 2 * SEQ_LEN
    assert res["tokens_seen"] == 4 * BATCH * 2 * SEQ_LEN, "tokens counted over both ranks"
    # val_loss in results.json is the mean over both ranks' windows, as Lightning's synced val/loss
    rows = [r for r in csv.DictReader((ddp_run / "csv" / "metrics.csv").open()) if r.get("val/loss")]
    assert math.isclose(float(rows[-1]["val/loss"]), res["val_loss"], rel_tol=1e-5)
    # rank 0 alone writes the run's files: one CSV logger version, one describer, rank 1 only its log
    assert sorted(p.name for p in (ddp_run / "csv").iterdir()) == ["hparams.yaml", "metrics.csv"]
    for name in ("last.ckpt", "model_config.json", "tokenizer.json", "config.yaml"):
        assert (ddp_run / "checkpoints" / name).is_file(), name
    assert (ddp_run / "train_ddp_process_1.log").is_file(), "rank 1 was started in the same run dir"


def test_eval_prints_the_val_loss_of_a_ddp_run(ddp_run, cache_dir, tmp_path):
    """Two ranks validate on the first 2 x limit_val_batches x batch windows together (and, with every window, on
    all of them: the last round is padded with label-less windows, not dropped): eval.py on the run's last.ckpt,
    one process, evaluates the same windows and prints the run's val_loss."""
    res = json.loads((ddp_run / "results.json").read_text())
    assert json.loads((ddp_run / "checkpoints" / "data.json").read_text())["world_size"] == 2
    out = tmp_path / "eval"
    run_cli("eval.py", f"ckpt_path={ddp_run / 'checkpoints' / 'last.ckpt'}", f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={out}", "max_new_tokens=2", "device=cpu")  # fp32 as trained (a GPU would run bf16)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["val_tokens"] == res["val_tokens"] == 2 * 2 * BATCH * SEQ_LEN
    assert ev["loss"] == pytest.approx(res["val_loss"], abs=1e-5)


def test_ddp_resumes_from_its_checkpoint(ddp_run, cache_dir, tmp_path):
    run_dir = tmp_path / "resumed"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("trainer.max_steps=")]
    proc = run_cli("train.py", *overrides, *DDP_CPU, "trainer.max_steps=6", f"paths.cache_dir={cache_dir}",
                   f"ckpt_path={ddp_run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={run_dir}",
                   DUMP, f"+callbacks.dump_weights.dirpath={run_dir / 'dump'}")
    res = json.loads((run_dir / "results.json").read_text())
    assert res["global_step"] == 6 and res["val_history"][-1][0] == 6
    # each rank continues the data stream after the 4 x 2 x 4 samples of the first run
    assert proc.stdout.count("resuming training data stream at sample 32") + \
        proc.stderr.count("resuming training data stream at sample 32") >= 1
    assert int(_ranks_agree(run_dir / "dump")["__global_step__"]) == 6


# ---------------------------------------------------------------------- submitit launchers
def test_slurm_launcher_config_resolves():
    """configs/hydra/launcher/slurm.yaml composes against the plugin's schema and ties SLURM's tasks and GPUs per
    node to trainer.devices (Lightning then takes its ranks from SLURM and starts no processes itself)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                                      "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 4
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"


@pytest.mark.slow
def test_two_job_sweep_through_the_submitit_local_launcher(tmp_path, cache_dir):
    """hydra/launcher=local: a two-job sweep runs through submitit's local executor (the code path SLURM jobs take:
    the job is pickled, run in a fresh process, its result pickled back), each job completes and writes its own
    results.json, and submitit keeps each job's logs."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    run_cli("train.py", "-m", "hydra/launcher=local", *TINY_OVERRIDES, "trainer.max_steps=2",
            "trainer.val_check_interval=2", "logger=csv", "callbacks.samples=null", "model.kv_lora_rank=8,16",
            "data.num_workers=0", "data.num_proc=1", f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}",
            timeout=400)
    ranks = {}
    for job in ("0", "1"):
        res = json.loads((sweep / job / "results.json").read_text())
        assert res["status"] == "completed" and res["global_step"] == 2, res
        ranks[job] = res["config"]["kv_lora_rank"]
    assert ranks == {"0": 8, "1": 16}
    logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, "submitit kept one stdout log per job"


# ---------------------------------------------------------------------- bad multi-GPU input, sharded checkpoints
def _settings(**kw):
    from deepseek_mini.training.run_config import TrainerSettings

    return TrainerSettings(max_steps=4, val_check_interval=2, **kw)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def gpu_run_config(two_gpus, tmp_path, monkeypatch):
    """conftest.run_config_of with trainer.accelerator=gpu on a faked two-GPU machine (no real GPU to ask for memory)."""
    from deepseek_mini.training import run_config as run_config_module

    monkeypatch.setattr(run_config_module, "_available_memory", lambda: None)
    return lambda *overrides: run_config_of(tmp_path, "trainer.accelerator=gpu", *overrides)


@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_more_devices_than_visible_gpus_is_refused(two_gpus, accelerator):
    from deepseek_mini.config import ConfigError

    with pytest.raises(ConfigError, match=r"^trainer.devices=3: this machine has 2 CUDA GPU"):
        _settings(accelerator=accelerator, devices=3)
    with pytest.raises(ConfigError, match=r"^trainer.devices=\[0, 2\]: GPU ids run from 0 to 1"):
        _settings(accelerator=accelerator, devices=[0, 2])
    for fine in (2, 1, -1, "auto", [0, 1]):
        _settings(accelerator=accelerator, devices=fine)


def test_gpu_devices_on_a_cpu_only_machine_are_refused(monkeypatch):
    from deepseek_mini.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^trainer.accelerator='gpu': this machine has no CUDA GPU"):
        _settings(accelerator="gpu", devices=2)
    _settings(accelerator="auto", devices="auto")


def test_fsdp_without_gpus_is_one_config_error(monkeypatch, tmp_path):
    """trainer=fsdp with accelerator=cpu used to pass the checks and fail inside Lightning's setup, after data
    preparation; now it is refused with one line that points at trainer=ddp for a CPU check."""
    from deepseek_mini.config import ConfigError

    def run_config(*overrides):
        return run_config_of(tmp_path, *overrides)

    with pytest.raises(ConfigError, match=r"^trainer=fsdp: FSDP needs CUDA GPUs.*trainer=ddp trainer.accelerator=cpu"):
        run_config("trainer=fsdp", "trainer.accelerator=cpu")
    assert run_config(*DDP_CPU).trainer.devices == 2  # the CPU check it suggests
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^trainer=fsdp: FSDP needs CUDA GPUs and this machine has none"):
        run_config("trainer=fsdp")  # accelerator: gpu, on a machine without one
    assert not (tmp_path / "run").exists()


def test_cuda_graphs_with_gradient_accumulation_is_one_config_error(gpu_run_config, tmp_path):
    """compile=reduce-overhead with accumulate_grad_batches=2 failed on an H200 at the first step (the second
    micro-batch's CUDA-graph replay overwrote the first one's gradients); it is refused before data preparation."""
    from deepseek_mini.config import ConfigError

    run_config = gpu_run_config
    for mode in ("reduce-overhead", "regional:reduce-overhead", "full:max-autotune"):
        with pytest.raises(ConfigError, match=r"^trainer.accumulate_grad_batches=2: gradient accumulation cannot run "
                                              r"with CUDA graphs"):
            run_config(f"compile={mode}", "trainer.accumulate_grad_batches=2")
    assert run_config("compile=reduce-overhead").trainer.accumulate_grad_batches == 1
    assert run_config("compile=regional", "trainer.accumulate_grad_batches=2").compile == "regional"
    assert run_config("compile=full:max-autotune-no-cudagraphs", "trainer.accumulate_grad_batches=2")
    assert not (tmp_path / "run").exists()


def test_regional_cuda_graphs_only_on_one_gpu_and_none_under_fsdp(gpu_run_config, tmp_path):
    """DDP with per-block CUDA graphs (the earlier meaning of compile=regional:reduce-overhead) trained nothing on
    two H200s (grad norm inf from step 19, loss stuck near 8.4) and finished as "completed". Regional compilation
    under whole-model graphs (training/compile.GraphedRegional) has run on one GPU only, so every multi-process
    strategy refuses it in one line before data preparation, naming what to use instead; CUDA graphs under FSDP
    are refused whatever the scope. The whole model as one graph trained right under DDP (docs/benchmarks.md),
    so DDP takes it."""
    from deepseek_mini.config import ConfigError

    run_config = gpu_run_config
    for mode in ("regional:reduce-overhead", "regional:max-autotune"):
        assert run_config(f"compile={mode}").compile == mode  # one GPU
        for extra in (("trainer=ddp", "trainer.devices=2"), ("trainer.devices=2",), ("trainer=ddp", "trainer.devices=1"),
                      ("trainer.devices=-1",)):
            with pytest.raises(ConfigError, match=rf"^compile='{mode}': regionally compiled blocks under whole-model "
                                                  r"CUDA graphs run on one GPU only \(.*\); use "
                                                  r"compile=full:reduce-overhead \(DDP, EP\) or compile=regional$"):
                run_config(*extra, f"compile={mode}")
    for devices in ("trainer.devices=2", "trainer.devices=-1", "trainer.devices=[0,1]", "trainer.devices=1"):
        with pytest.raises(ConfigError, match=r"^compile='full:reduce-overhead': CUDA graphs are refused with FSDP "
                                              r"\(.*\); use compile=regional, FSDP's fastest measured setting, or trainer=ddp$"):
            run_config("trainer=fsdp", devices, "compile=reduce-overhead")
        assert run_config("trainer=fsdp", devices, "compile=regional").compile == "regional"
        assert run_config("trainer=ddp", devices, "compile=reduce-overhead").compile == "full:reduce-overhead"
    assert run_config("trainer=ddp", "trainer.devices=2", "compile=regional").compile == "regional"
    assert run_config("trainer=ddp", "trainer.devices=2", "compile=full:max-autotune-no-cudagraphs")
    assert run_config("compile=reduce-overhead").compile == "full:reduce-overhead"  # one GPU: measured right
    assert not (tmp_path / "run").exists()


def test_a_killed_sharded_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """Lightning writes a sharded checkpoint's shards over the previous ones in place; a save that dies midway
    used to leave neither. AtomicFSDPStrategy writes beside the target and moves the directory in when done.
    (No process group here: FSDPStrategy's broadcast and barrier are no-ops, as on one rank.)"""
    from lightning.pytorch.strategies import FSDPStrategy

    from deepseek_mini.training.strategies import AtomicFSDPStrategy, fsdp_strategy

    def lightning_save(self, checkpoint, filepath, storage_options=None):  # what FSDPStrategy does, in short
        path = Path(filepath)
        path.mkdir(parents=True, exist_ok=True)
        (path / "__0_0.distcp").write_text(f"shard of step {checkpoint['global_step']}")
        if checkpoint.get("die"):
            raise RuntimeError("killed while writing shards")
        (path / "meta.pt").write_text(f"meta of step {checkpoint['global_step']}")

    monkeypatch.setattr(FSDPStrategy, "save_checkpoint", lightning_save)
    strategy = fsdp_strategy()
    assert isinstance(strategy, AtomicFSDPStrategy)
    last = tmp_path / "last.ckpt"
    strategy.save_checkpoint({"global_step": 2}, last)
    with pytest.raises(RuntimeError, match="killed"):
        strategy.save_checkpoint({"global_step": 4, "die": True}, last)
    assert (last / "__0_0.distcp").read_text() == "shard of step 2", "the previous checkpoint is whole"
    assert (last / "meta.pt").read_text() == "meta of step 2"
    strategy.save_checkpoint({"global_step": 6}, last)  # the next save clears the killed one's leftovers
    assert (last / "meta.pt").read_text() == "meta of step 6"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def _shard(ckpt_file: Path, out_dir: Path) -> Path:
    """The layout Lightning's FSDPStrategy(state_dict_type="sharded") writes (torch.distributed.checkpoint files
    of {"model", "optimizer_0"} + meta.pt with the rest), made from a full checkpoint in one process."""
    import warnings

    import torch.distributed.checkpoint as dcp

    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    state = {"model": ckpt.pop("state_dict")}
    state.update({f"optimizer_{i}": o for i, o in enumerate(ckpt.pop("optimizer_states", []))})
    out_dir.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=out_dir)
    torch.save(ckpt, out_dir / "meta.pt")
    return out_dir


@pytest.fixture
def sharded_run(ddp_run, tmp_path) -> Path:
    """A copy of the DDP run (2 ranks) whose checkpoints/last.ckpt is a sharded directory."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ddp_run, run, ignore=shutil.ignore_patterns("dump", "*.lock", ".run.lock"))
    last = run / "checkpoints" / "last.ckpt"
    full = last.rename(run / "full.ckpt")
    _shard(full, last)
    return run


def test_last_resolves_to_a_sharded_directory_and_its_shards_are_verified(sharded_run):
    from deepseek_mini.checkpoint import CheckpointError
    from deepseek_mini.training.checkpoint_io import read_checkpoint_meta
    from deepseek_mini.training.resume import latest_run_with_checkpoint, resolve_ckpt_path

    last = sharded_run / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(last)
    assert resolve_ckpt_path("last", sharded_run) == last
    assert resolve_ckpt_path(str(last), Path("/nonexistent")) == last.resolve()
    assert latest_run_with_checkpoint(sharded_run.parent) == sharded_run
    meta = read_checkpoint_meta(last)
    assert meta["global_step"] == 4 and meta["callbacks"]["RunHistory"]["world_size"] == 2
    shard = next(last.glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a save killed midway
    with pytest.raises(CheckpointError, match=r"shard __0_0.distcp is truncated"):
        resolve_ckpt_path("last", sharded_run)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"shard __0_0.distcp is missing"):
        resolve_ckpt_path("last", sharded_run)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.slow
def test_sharded_resume_on_another_world_size_is_refused_and_the_run_dir_is_untouched(sharded_run, cache_dir):
    before = _tree(sharded_run)
    proc = run_cli("train.py", *TINY_OVERRIDES, "trainer.devices=1", f"paths.cache_dir={cache_dir}",
                   f"hydra.run.dir={sharded_run}", "ckpt_path=last", "model.bias_update_speed=0.01", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: trainer.devices=1: the sharded FSDP checkpoint"), lines
    assert "written by 2 ranks" in lines[0] and "trainer.devices=2" in lines[0]
    assert _tree(sharded_run) == before, "a refused resume changes nothing in the run dir"


def test_sharded_checkpoint_resumes_only_under_fsdp(sharded_run):
    """DDP or one device would reach Lightning's torch.load of a directory after data preparation."""
    from deepseek_mini.config import ConfigError
    from deepseek_mini.training.checkpoint_io import read_checkpoint_meta
    from deepseek_mini.training.resume import check_world_size

    last = sharded_run / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"a sharded FSDP checkpoint resumes only with trainer=fsdp"):
        check_world_size(_compose(*TINY_OVERRIDES, *DDP_CPU), last, read_checkpoint_meta(last), None)
    check_world_size(_compose(*TINY_OVERRIDES, "trainer=fsdp"), last, read_checkpoint_meta(last), None)  # 2 ranks


def test_full_checkpoint_resumes_on_another_world_size_with_a_warning(ddp_run, caplog):
    from deepseek_mini.training.checkpoint_io import read_checkpoint_meta
    from deepseek_mini.training.resume import check_world_size

    last = ddp_run / "checkpoints" / "last.ckpt"
    cfg = _compose(*TINY_OVERRIDES, "trainer.devices=1")
    with caplog.at_level("WARNING"):
        check_world_size(cfg, last, read_checkpoint_meta(last), None)
    assert "world size 2 -> 1" in caplog.text
    caplog.clear()
    check_world_size(_compose(*TINY_OVERRIDES, *DDP_CPU), last, read_checkpoint_meta(last), None)
    assert "world size" not in caplog.text


def test_entry_points_name_the_consolidation_command_for_a_sharded_directory(sharded_run):
    from deepseek_mini.checkpoint import CheckpointError, load_checkpoint
    from deepseek_mini.training.strategies import consolidate_checkpoint

    last = sharded_run / "checkpoints" / "last.ckpt"
    for given in (last, sharded_run / "checkpoints"):  # eval.py / generate.py / export_hf.py all load this way
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(given)
        msg = str(e.value)
        assert "\n" not in msg and "sharded FSDP checkpoint" in msg
        assert f"python -m lightning.pytorch.utilities.consolidate_checkpoint {last}" in msg
        assert f"{last}.consolidated" in msg
    out = consolidate_checkpoint(last)
    assert out == last.with_name("last.ckpt.consolidated")
    loaded, full = load_checkpoint(out), load_checkpoint(sharded_run / "full.ckpt")
    assert loaded.tokenizer is not None
    a, b = loaded.model.state_dict(), full.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rank_one_of_a_ddp_resume_finds_last_in_the_quoted_run_dir(ddp_run, monkeypatch):
    """Lightning starts rank 1..N-1 with `<user args> hydra.run.dir="<run dir>"` (quoted). The pre-flight took the
    quotes as part of the path, so every DDP resume with ckpt_path=last failed on rank 1 ("no checkpoint
    \\"<dir>\\"/checkpoints/last.ckpt", seen in scripts/bench/multi_gpu.sh's CPU dry run)."""
    from deepseek_mini.training.reliability import _preflight_resume

    monkeypatch.setenv("LOCAL_RANK", "1")  # as rank 1: it takes no run lock
    argv = [*TINY_OVERRIDES, *DDP_CPU, f"hydra.run.dir={ddp_run}", "ckpt_path=last", f'hydra.run.dir="{ddp_run}"',
            "hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null"]
    out = _preflight_resume(argv, str(CONFIGS), "train")
    assert out[: len(argv)] == argv


def test_gpu_experiments_compile_settings(gpu_run_config, tmp_path):
    """experiment=small_gpu graphs the regionally compiled model on one GPU; with trainer=ddp it is refused in one
    line naming the setting DDP has run with, which ep_small_gpu and mtp_small_gpu keep (the settings their runs
    were measured with)."""
    from deepseek_mini.config import ConfigError

    run_config = gpu_run_config
    assert run_config("experiment=small_gpu").compile == "regional:reduce-overhead"
    with pytest.raises(ConfigError, match=r"^compile='regional:reduce-overhead': regionally compiled blocks under "
                                          r"whole-model CUDA graphs run on one GPU only"):
        run_config("experiment=small_gpu", "trainer=ddp", "trainer.devices=2")
    ddp = run_config("experiment=small_gpu", "trainer=ddp", "trainer.devices=2", "compile=full:reduce-overhead")
    assert ddp.compile == "full:reduce-overhead"
    assert run_config("experiment=mtp_small_gpu").compile == "full:reduce-overhead"
    assert run_config("experiment=ep_small_gpu").compile == "full:reduce-overhead"
    assert not (tmp_path / "run").exists()

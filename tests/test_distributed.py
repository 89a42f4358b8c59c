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
from conftest import CONFIGS, TINY_OVERRIDES, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deepseek_mini.training.strategies import build_strategy, global_batch, is_sharded_checkpoint

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


def test_ddp_config_builds_a_ddp_strategy():
    from lightning.pytorch.strategies import DDPStrategy

    cfg = _compose("trainer=ddp")
    assert cfg.trainer.use_distributed_sampler is False and cfg.trainer.devices == 2
    kwargs = build_strategy({"strategy": OmegaConf.to_container(cfg.trainer.strategy, resolve=True)})
    strategy = kwargs["strategy"]
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs["find_unused_parameters"] is False
    assert strategy._ddp_kwargs["gradient_as_bucket_view"] is True
    # broadcast_buffers, the name every torch 2.x DDP takes (forward_sync_buffers exists only from 2.13 on:
    # torch 2.11 on the GPU machine refused it)
    assert strategy._ddp_kwargs["broadcast_buffers"] is False and "forward_sync_buffers" not in strategy._ddp_kwargs


def test_fsdp_config_wraps_each_block_and_keeps_buffers_fp32():
    from lightning.pytorch.strategies import FSDPStrategy

    from deepseek_mini.model.transformer import Block

    cfg = _compose("trainer=fsdp")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.use_distributed_sampler is False
    assert cfg.get("compile") is False, "torch.compile stays off by default (not combined with FSDP)"
    strategy = build_strategy({"strategy": OmegaConf.to_container(cfg.trainer.strategy, resolve=True)})["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy.sharding_strategy.name == "FULL_SHARD" and strategy._state_dict_type == "sharded"
    mp = strategy.mixed_precision
    assert mp.param_dtype == torch.bfloat16 and mp.buffer_dtype == torch.float32 and mp.reduce_dtype == torch.float32
    assert not is_sharded_checkpoint(CONFIGS)


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

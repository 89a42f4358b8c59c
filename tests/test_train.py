"""End to end on CPU, through the command line: train.py, eval.py on its checkpoint, resume, a 2x2 sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, needs_trusted_cpu_compile, run_cli
from lightning.pytorch.profilers import SimpleProfiler

from deepseek_mini.checkpoint import load_checkpoint
from deepseek_mini.config import ModelConfig

pytestmark = pytest.mark.slow

RESULT_KEYS = {"val_loss", "val_loss_start", "train_loss", "tokens_seen", "tokens_per_sec", "params_total",
               "params_active", "kv_cache_bytes_per_token", "checkpoint", "config", "compile"}


@pytest.fixture(scope="module")
def trained_proc(tmp_path_factory, cache_dir):
    """One tiny CPU training run as a user starts it (the progress bar on), shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    overrides = [o for o in TINY_OVERRIDES if o != "callbacks.progress_bar=null"]
    proc = run_cli("train.py", *overrides, "model.kv_lora_rank=16", f"paths.cache_dir={cache_dir}",
                   f"hydra.run.dir={run_dir}")
    return run_dir, proc


@pytest.fixture(scope="module")
def trained(trained_proc) -> Path:
    return trained_proc[0]


def test_tiny_run_ends_on_the_summary_block(trained_proc):
    run_dir, proc = trained_proc
    lines = proc.stdout.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if "run summary" in line)
    block = "\n".join(lines[start:])
    assert lines[-1] == f"results: {run_dir.resolve() / 'results.json'}", lines[-3:]
    res = json.loads((run_dir / "results.json").read_text())
    assert f"{res['val_loss_start']:.4f} -> {res['val_loss']:.4f}" in block
    assert f"run dir: {run_dir.resolve()}" in block and "resume: python train.py hydra.run.dir=" in block
    assert res["time_to_first_step_sec"] is not None and res["time_to_first_step_sec"] > 0
    # from the process launch: the imports and data preparation before trainer.fit() are in it
    assert res["time_to_first_step_sec"] > res["fit_to_first_step_sec"] > 0 and "from launch" in block
    # where the wait before fit() went (training/startup.py): the stages add up to the first step's time
    stages = res["startup_sec"]
    assert list(stages) == ["launch", "data", "model", "validation"] and stages["launch"] > 0, stages
    assert sum(stages.values()) + res["fit_to_first_step_sec"] == pytest.approx(res["time_to_first_step_sec"],
                                                                                abs=0.1)
    assert f"(start-up {stages['launch']:.1f} s, data {stages['data']:.1f} s" in block, block
    assert res["first_step_graphs"] == {"from_cache": 0, "compiled": 0}  # an eager run compiles no graph
    out = proc.stdout + proc.stderr
    config_line = next(line for line in out.splitlines() if "config: model (" in line)  # what is about to train
    assert "seq_len 32 x batch 4; 4 steps" in config_line and "kv_lora_rank" in config_line, config_line
    for noise in ("litlogger", "LeafSpec", "anonymous setting", "Total FLOPs", "\nwandb:", "v_num", "Epoch 0"):
        assert noise not in out, noise  # (the tests set WANDB_SILENT; test_console.test_wandb_logger_is_quiet covers wandb)
    # the offline wandb run is readable without an account
    assert json.loads((run_dir / "wandb" / "summary.json").read_text())["val_loss"] == res["val_loss"]
    assert json.loads((run_dir / "wandb" / "config.json").read_text())["model"]["vocab_size"] == 512


def test_train_writes_results(trained):
    res = json.loads((trained / "results.json").read_text())
    assert RESULT_KEYS <= set(res)
    assert res["global_step"] == 4 and res["tokens_seen"] == 4 * 4 * 32
    assert math.isfinite(res["val_loss"]) and math.isfinite(res["val_loss_start"]) and math.isfinite(res["train_loss"])
    assert res["val_loss"] < res["val_loss_start"], "even 4 steps lower the loss of a fresh model"
    assert res["tokens_per_sec"] > 0
    assert res["compile"] is None  # compile=false, the default: what ran
    assert res["config"] == ModelConfig.from_dict(res["config"]).to_dict() and res["config"]["kv_lora_rank"] == 16
    assert res["kv_cache_bytes_per_token"] == ModelConfig.from_dict(res["config"]).kv_cache_bytes_per_token(2)
    assert res["params_active"] < res["params_total"]
    assert Path(res["checkpoint"]).is_file()


def test_run_throughput_leaves_out_the_first_window():
    """The first window holds compilation / CUDA-graph recording; results.json's tokens/s is the steady rate."""
    from deepseek_mini.training.callbacks import ThroughputMonitor

    m = ThroughputMonitor()
    for seconds in (10.0, 1.0, 1.0):  # a slow first window (compiling), then two steady ones
        m._add(seconds, 1000)
    assert m.tokens_seen == 3000 and m.train_time == 12.0
    assert m.tokens_per_sec == 1000.0  # not 3000 / 12
    single = ThroughputMonitor()
    single._add(2.0, 1000)
    assert single.tokens_per_sec == 500.0  # one window: nothing else to go by


def test_checkpoint_dir_is_self_describing(trained):
    ckpt_dir = trained / "checkpoints"
    for name in ("last.ckpt", "model_config.json", "tokenizer.json", "config.yaml"):
        assert (ckpt_dir / name).is_file(), name
    assert list(ckpt_dir.glob("best-*.ckpt")), "best checkpoint by val/loss"
    raw = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)  # plain hparams only
    assert all(k.startswith("model.") and "_orig_mod" not in k for k in raw["state_dict"])
    assert isinstance(raw["hyper_parameters"]["model_config"], dict)
    loaded = load_checkpoint(ckpt_dir / "last.ckpt")
    assert loaded.config.to_dict() == json.loads((ckpt_dir / "model_config.json").read_text())
    assert loaded.tokenizer is not None and loaded.tokenizer.get_vocab_size() == loaded.config.vocab_size
    out = loaded.model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, loaded.config.vocab_size)


def test_loggers_wrote_wandb_and_csv(trained):
    assert len(list((trained / "wandb").glob("offline-run-*"))) == 1
    metrics = (trained / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "train/perplexity", "train/aux_loss", "train/grad_norm", "train/lr",
                "train/tokens_per_sec", "val/loss", "val/perplexity", "model/params_total",
                "train/moe/layer1/max_load", "val/moe/layer1/entropy", "val/moe/layer1/dropped_fraction"):
        assert key in metrics, key
    assert (trained / "expert_load.png").is_file()
    log = (trained / "train.log").read_text()  # samples after training steps, none of the untrained model's
    assert "sample @ step 2:" in log and "sample @ step 4:" in log and "sample @ step 0:" not in log


def test_eval_uses_the_checkpoint_config_and_tokenizer(trained, cache_dir, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    # data overrides only: the model comes from the checkpoint (kv_lora_rank=16 is not the tiny default)
    proc = run_cli("eval.py", f"ckpt_path={ckpt}", "data.seq_len=32", "data.batch_size=4", "data.max_chars=200000",
                   "data.val_fraction=0.1", f"paths.cache_dir={cache_dir}", "limit_batches=2", "max_new_tokens=8",
                   f"hydra.run.dir={tmp_path / 'eval'}")
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert res["config"]["kv_lora_rank"] == 16
    train_res = json.loads((trained / "results.json").read_text())
    assert abs(res["loss"] - train_res["val_loss"]) < 0.5
    assert math.isclose(res["perplexity"], math.exp(res["loss"]), rel_tol=1e-6)
    assert res["kv_cache_bytes_per_token"]["computed_bf16"] == train_res["kv_cache_bytes_per_token"]
    assert res["expert_load"] and {"max_load", "min_load", "entropy", "tokens_per_expert"} <= set(res["expert_load"][0])
    assert isinstance(res["sample"], str)
    kv_rows = {row["attention"].lower(): row for row in res["kv_cache_table"]}  # MHA/GQA/MQA/MLA at this shape
    assert set(kv_rows) == {"mha", "gqa", "mqa", "mla"}
    assert kv_rows["mla"]["bytes_per_token_bf16"] == res["kv_cache_bytes_per_token"]["computed_bf16"]
    assert "| MLA |" in proc.stdout
    assert "run dir:" in proc.stdout


def test_eval_missing_checkpoint_fails_cleanly(tmp_path, capsys, monkeypatch):
    from conftest import run_script_inprocess

    code, _, err = run_script_inprocess("eval.py", [f"ckpt_path={tmp_path}/nope.ckpt", f"hydra.run.dir={tmp_path / 'eval'}"],
                                        capsys, monkeypatch)
    assert code == 2 and "error: checkpoint not found" in err, err


def test_resume_from_checkpoint(trained, cache_dir, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("trainer.max_steps")]
    run_cli("train.py", *overrides, "model.kv_lora_rank=16", "trainer.max_steps=7", f"ckpt_path={ckpt}",
            "logger=csv", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'resumed'}")
    res = json.loads((tmp_path / "resumed" / "results.json").read_text())
    first = json.loads((trained / "results.json").read_text())
    # counters are the run's, over the resume (issue 19.6): the first part's start loss, tokens and validations
    assert res["global_step"] == 7 and res["val_loss_start"] == first["val_loss_start"]
    assert res["tokens_seen"] == 7 * 4 * 32 and res["steps_trained"] == 3
    assert [s for s, _ in res["val_history"]] == [0, 2, 4, 6, 7] and res["val_history"][:3] == first["val_history"]
    # step 7 is no validation step (every 2): the final validate() must not wipe the training loss from the results
    assert res["val_history"][-1][0] == 7 and math.isfinite(res["train_loss"])



class StageRecorder(SimpleProfiler):
    """A profiler that records the trainer stages (fit, validate) it is set up for."""

    stages: list[str] = []

    def setup(self, stage, local_rank=None, log_dir=None):
        StageRecorder.stages.append(getattr(stage, "value", stage))
        super().setup(stage, local_rank, log_dir)


@needs_trusted_cpu_compile
def test_the_model_is_built_on_the_strategys_device_and_validated_uncompiled_before_fit(tmp_path, cache_dir, capsys,
                                                                                       monkeypatch):
    """Three things that used to go wrong around fit(), checked in one tiny run:
    * the model LitDeepSeek trains (and with it every weight's initialisation) is created inside the Trainer
      strategy's tensor-init context, so a GPU run draws its weights on its GPU instead of the host (seconds at
      `small`, minutes for the 10B of experiment=ep_big_gpu); on CPU the context is the CPU: the same weights;
    * the validation before fit() runs the eager model (compiled, it would compile the eval graph before the
      first training step); the training steps and the validation inside fit() run the compiled one. The
      compiled module is stood in for by a recorder around the eager model (no real compilation);
    * with Lightning's PyTorchProfiler (`+trainer.profiler=pytorch`) the run used to end in a traceback without
      results.json: it failed in the teardown of the run's own validate() calls, which now run outside any
      profiler (a recorder of the stages a profiler is set up for stands in: PyTorchProfiler costs ~25 s here).
      The profiler is given as a node with a _target_, which used to reach Lightning as a dict."""
    from contextlib import contextmanager

    from conftest import run_script_inprocess
    from lightning.pytorch.strategies.strategy import Strategy

    from deepseek_mini.model import DeepSeekV2
    from deepseek_mini.training import module as module_mod

    inside, seen, calls = [False], [], []
    original_ctx, original_init = Strategy.tensor_init_context, DeepSeekV2.__init__

    @contextmanager
    def tensor_init_context(self, empty_init=None):
        with original_ctx(self, empty_init=empty_init):
            inside[0] = True
            try:
                yield
            finally:
                inside[0] = False

    def init(self, cfg):
        seen.append((inside[0], torch.get_default_device().type))
        original_init(self, cfg)

    def fake_compile(model, spec, dynamic=False):
        def compiled(*args, **kwargs):
            calls.append("train" if model.training else "eval")
            return model(*args, **kwargs)
        return compiled

    monkeypatch.setattr(Strategy, "tensor_init_context", tensor_init_context)
    monkeypatch.setattr(DeepSeekV2, "__init__", init)
    monkeypatch.setattr(module_mod, "compile_model", fake_compile)
    code, out, err = run_script_inprocess("train.py", [*TINY_OVERRIDES, "compile=full", "callbacks.model_checkpoint=null",
                                                       # a Trainer argument as a _target_ node: built, not a dict
                                                       "+trainer.profiler._target_=test_train.StageRecorder",
                                                       f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}"],
                                          capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert seen[0] == (True, "cpu")  # the training model (the first one built)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "completed" and math.isfinite(res["val_loss_start"]) and math.isfinite(res["val_loss"])
    assert StageRecorder.stages == ["fit"]  # the profiler saw the fit, not the validations before and after it
    # 4 steps, validation at steps 2 and 4 (2 batches each): nothing compiled ran before the first step
    assert calls[0] == "train" and calls.count("train") == 4 and calls.count("eval") == 4, calls

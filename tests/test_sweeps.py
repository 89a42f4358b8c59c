"""Sweeps: iso-FLOP / matched-size rules, the sweep presets compose, a CPU 2x2 multirun with one failing job,
and the sweep report on it (plus a synthetic 5x5 grid and an attention ablation for the plots)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS, TINY_OVERRIDES, run_cli
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from deepseek_mini.analysis.sweep_plots import pareto_front
from deepseek_mini.analysis.sweep_report import PLOT_FILES, write_report
from deepseek_mini.config import ConfigError, ModelConfig, attention_parameters, count_parameters, flops_per_token
from deepseek_mini.training.run import model_config_from
from deepseek_mini.training.sizing import apply_sizing, wandb_sweep_fields

SWEEPS = ("rank_x_experts", "attention_ablation", "moe_vs_dense")
REF = {"n_routed_experts": 4, "num_experts_per_tok": 1, "moe_intermediate_size": 256, "n_shared_experts": 1}


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def teardown_module():
    GlobalHydra.instance().clear()


# ---------------------------------------------------------------------- sizing rules
@pytest.mark.parametrize("scale_topk", [True, False])
def test_iso_flop_keeps_active_flops_constant(scale_topk):
    base = {**ModelConfig.preset("tiny").to_dict(), "hidden_size": 256, "num_experts_per_tok": 2}
    sizing = {"iso_flop": True, "scale_topk": scale_topk, "reference": REF}
    flops, expert_params = [], []
    for e in (4, 8, 16, 32, 64):
        cfg = ModelConfig.from_dict(apply_sizing({**base, "n_routed_experts": e}, sizing))
        assert cfg.moe_intermediate_size % 8 == 0
        flops.append(flops_per_token(cfg, 256) - 6 * count_parameters(cfg).router)  # the router grows with E
        expert_params.append(count_parameters(cfg).routed_experts)
        if scale_topk:  # DeepSeekMoE segmentation: top-k x width and shared width fixed
            assert (cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (e // 4, 1024 // e)
            assert cfg.n_shared_experts * cfg.moe_intermediate_size == 256
    assert max(flops) == pytest.approx(min(flops), rel=1e-9)
    assert (len(set(expert_params)) == 1) == scale_topk  # total expert params constant only when segmenting


def test_iso_flop_errors_name_the_field():
    sizing = {"iso_flop": True, "scale_topk": True, "reference": REF}
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        apply_sizing({**ModelConfig.preset("tiny").to_dict(), "n_routed_experts": 2}, sizing)
    with pytest.raises(ConfigError, match="sizing.reference"):
        apply_sizing({**ModelConfig.preset("tiny").to_dict()}, {"iso_flop": True})
    assert apply_sizing({"a": 1}, None) == {"a": 1} and apply_sizing({"a": 1}, {}) == {"a": 1}


def test_attention_and_dense_matching():
    base = {**ModelConfig.preset("tiny").to_dict(), "hidden_size": 256, "qk_nope_head_dim": 64,
            "qk_rope_head_dim": 32, "v_head_dim": 64, "kv_lora_rank": 64}
    sizing = {"kv_heads": {"mha": None, "gqa": 2, "mqa": 1, "mla": None}, "match_attention_params": True}
    sized = {a: ModelConfig.from_dict(apply_sizing({**base, "attention": a}, sizing)) for a in ("mha", "gqa", "mqa", "mla")}
    mla = attention_parameters(sized["mla"])
    for a, cfg in sized.items():
        assert abs(attention_parameters(cfg) - mla) / mla < 0.01, a
    assert sized["gqa"].num_key_value_heads == 2 and sized["mqa"].num_key_value_heads == 1
    ref = {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "n_shared_experts": 1}
    moe = ModelConfig.from_dict({**base, **ref})
    dense = ModelConfig.from_dict(apply_sizing({**base, "n_routed_experts": None},
                                               {"dense_match_active": True, "reference": ref}))
    assert not dense.is_moe and dense.first_k_dense_replace == 0 and dense.intermediate_size % 8 == 0
    assert abs(count_parameters(dense).active - count_parameters(moe).active) / count_parameters(moe).active < 0.01


def test_wandb_sweep_fields_are_top_level():
    out = wandb_sweep_fields({"kv_lora_rank": 64, "n_routed_experts": 16, "attention": "mla"},
                             ["model.kv_lora_rank=64", "optim.lr=0.001", "paths.cache_dir=x", "experiment=y"])
    assert out["kv_lora_rank"] == 64 and out["n_routed_experts"] == 16 and out["lr"] == "0.001"
    assert "cache_dir" not in out and "experiment" not in out


# ---------------------------------------------------------------------- presets compose
@pytest.mark.parametrize("name", [*SWEEPS, "sweep_gpu"])
def test_sweep_presets_compose(name, tmp_path):
    cfg = _compose([f"experiment={name}", f"paths.output_dir={tmp_path}"])
    model_config_from(cfg)
    assert cfg.data.seq_len * cfg.data.batch_size * cfg.trainer.max_steps == 2_457_600  # tokens per job
    assert cfg.compile is False
    if name == "sweep_gpu":
        return
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.logger.wandb.group.startswith(f"{name}-") and name in cfg.tags
    params = cfg.hydra.sweeper.params
    grid = {k: str(v).split(",") for k, v in params.items()}
    jobs = math.prod(len(v) for v in grid.values())
    assert jobs == {"rank_x_experts": 25, "attention_ablation": 4, "moe_vs_dense": 2}[name]
    # every grid point is a valid model under the preset's sizing rules
    keys = list(grid)
    for combo in itertools.product(*grid.values()):
        overrides = [f"{k}={v}" for k, v in zip(keys, combo)]
        cfg = _compose([f"experiment={name}", f"paths.output_dir={tmp_path}", *overrides])
        assert cfg.logger.wandb.name == ",".join(overrides)  # the job name carries the overrides
        model_config_from(cfg)


def test_hydra_launcher_and_optuna_configs_are_documented():
    slurm = yaml.safe_load((CONFIGS / "hydra" / "launcher" / "slurm.yaml").read_text())
    assert slurm["tasks_per_node"] == slurm["gpus_per_node"] == "${trainer.devices}"
    optuna = yaml.safe_load((CONFIGS / "hparams_search" / "optuna_rank_experts.yaml").read_text())
    assert optuna["hydra"]["sweeper"]["direction"] == "minimize" and optuna["optimized_metric"] == "val_loss"
    readme = (CONFIGS.parent / "README.md").read_text()
    for word in ("## Sweeps", "experiment=rank_x_experts", ".[hpo]", ".[slurm]", "sweep_report.py"):
        assert word in readme, word


# ---------------------------------------------------------------------- report on synthetic sweeps
def _fake_job(path: Path, overrides: list[str], config: dict, val_loss: float | None, status: str = "completed"):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if status == "missing":
        (path / "train.log").write_text("[2025-01-01 00:00:00,000][x][ERROR] - RuntimeError: CUDA out of memory\n")
        return
    if status == "failed":
        (path / "results.json").write_text(json.dumps({"status": "failed", "error": "ConfigError: bad value"}))
        return
    cfg = ModelConfig.from_dict(config)
    counts = count_parameters(cfg)
    steps = [0, 100, 200, 300]
    vals = [8.0, val_loss + 1.0, val_loss + 0.3, val_loss]
    (path / "results.json").write_text(json.dumps({
        "status": status, "val_loss": val_loss, "val_loss_start": 8.0, "train_loss": val_loss + 0.05,
        "global_step": 300, "tokens_seen": 300 * 8192, "tokens_per_sec": 150000.0, "params_total": counts.total,
        "params_active": counts.active, "kv_cache_bytes_per_token": cfg.kv_cache_bytes_per_token(2),
        "config": cfg.to_dict(), "val_history": [[s, v] for s, v in zip(steps, vals)]}))
    (path / "csv").mkdir()
    rows = ["step,train/loss,val/loss"] + [f"{s},{8.0 - s / 300 * (8.0 - val_loss) + 0.05:.4f}," for s in range(20, 301, 20)]
    rows += [f"{s},,{v}" for s, v in zip(steps, vals)]
    (path / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_report_on_synthetic_grid_and_ablation(tmp_path):
    base = ModelConfig.preset("tiny").to_dict()
    grid = tmp_path / "grid"
    n = 0
    for r in (16, 32, 64, 128, 256):
        for e in (4, 8, 16, 32, 64):
            sized = apply_sizing({**base, "kv_lora_rank": r, "n_routed_experts": e},
                                 {"iso_flop": True, "scale_topk": True, "reference": REF})
            loss = 4.0 - 0.05 * math.log2(r) - 0.03 * math.log2(e) + 0.001 * n
            _fake_job(grid / str(n), [f"model.kv_lora_rank={r}", f"model.n_routed_experts={e}"], sized,
                      loss, status="missing" if n == 24 else "completed")
            n += 1
    report = write_report([grid]).read_text()
    assert "Jobs: 25 (24 ok, 1 failed)" in report and "CUDA out of memory" in report
    for key in ("rank", "experts", "kv", "curves", "bars"):
        assert (grid / PLOT_FILES[key]).stat().st_size > 10_000, key
    table = [ln for ln in report.split("## Failed")[0].splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    losses = [float(ln.split(" | ")[-7]) for ln in table]
    assert len(table) == 24 and losses == sorted(losses)
    assert "moe_intermediate_size" in report.splitlines()[[i for i, ln in enumerate(report.splitlines())
                                                           if ln.startswith("| # | job")][0]]

    abl = tmp_path / "abl"
    sizing = {"kv_heads": {"mha": None, "gqa": 2, "mqa": 1, "mla": None}, "match_attention_params": True}
    for i, (a, loss) in enumerate([("mha", 3.60), ("gqa", 3.63), ("mqa", 3.70), ("mla", 3.61)]):
        _fake_job(abl / str(i), [f"model.attention={a}"], apply_sizing({**base, "attention": a}, sizing), loss)
    report = write_report([abl]).read_text()
    assert "Jobs: 4 (4 ok, 0 failed)" in report and "| attention |" in report
    assert (abl / PLOT_FILES["kv"]).is_file() and not (abl / PLOT_FILES["rank"]).exists()
    assert pareto_front([(1, 3.0), (2, 2.0), (3, 2.5), (4, 1.0)]) == [0, 1, 3]


# ---------------------------------------------------------------------- CPU multirun + report
SMOKE_MODEL = ["model.vocab_size=512", "model.max_position_embeddings=64", "model.hidden_size=32",
               "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.qk_nope_head_dim=8",
               "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.intermediate_size=64"]


@pytest.mark.slow
def test_cpu_multirun_2x2_then_report(tmp_path, cache_dir):
    """experiment=rank_x_experts shrunk to a 2x2 grid of n_routed_experts x num_experts_per_tok with the iso-FLOP
    rule at fixed top-k; (1 expert, top-2) is invalid, so that job fails and the other three finish, each with
    its own offline wandb run (the preset's csv + wandb loggers)."""
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("callbacks.samples", "callbacks.progress_bar",
                                                           "model."))]
    run_cli("train.py", "experiment=rank_x_experts", "data=stdlib", *SMOKE_MODEL, *tiny,
            "model.kv_lora_rank=16", "model.n_routed_experts=4,1", "model.num_experts_per_tok=1,2",
            "sizing.scale_topk=false", "sizing.reference.moe_intermediate_size=64", "data.num_workers=0",
            "data.num_proc=1", f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}", check=False, timeout=300)
    jobs = sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert jobs == ["0", "1", "2", "3"], "one numbered job dir per grid point"
    ok = {}
    for j in ("0", "1", "2"):
        res = json.loads((sweep / j / "results.json").read_text())
        c = res["config"]
        ok[j] = (c["n_routed_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"], c["n_shared_experts"])
        assert math.isfinite(res["val_loss"])
    # iso-FLOP at fixed top-k: width = 64 * 1 / top-k, shared count keeps the shared width at 64
    assert ok == {"0": (4, 1, 64, 1), "1": (4, 2, 32, 2), "2": (1, 1, 64, 1)}
    run_ids = set()
    for j in ("0", "1", "2"):
        runs = list((sweep / j / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"job {j}: one wandb run per job, got {runs}"
        run_ids.add(runs[0].name.rsplit("-", 1)[-1])
    assert len(run_ids) == 3, "each job its own wandb run"

    proc = run_cli("scripts/sweep_report.py", str(sweep), timeout=120)
    assert "4 jobs (3 ok, 1 failed)" in proc.stdout
    report = (sweep / "report.md").read_text()
    assert "Jobs: 4 (3 ok, 1 failed)" in report
    failed = report.split("## Failed jobs (1)")[1].split("## Plots")[0]
    assert "model.n_routed_experts=1" in failed and "model.num_experts_per_tok=2" in failed
    assert "num_experts_per_tok" in failed.split("|")[-2] or "must be <=" in failed or "no results.json" in failed
    table = [ln for ln in report.split("## Failed")[0].splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert len(table) == 3
    for key in ("experts", "curves", "bars"):
        png = sweep / PLOT_FILES[key]
        assert png.is_file() and png.stat().st_size > 5_000, key
        assert f"]({PLOT_FILES[key]})" in report


def test_optimized_metric_for_the_sweeper():
    from omegaconf import OmegaConf

    from deepseek_mini.training.run import optimized_metric

    cfg = OmegaConf.create({"optimized_metric": "val_loss"})
    assert optimized_metric(cfg, {"val_loss": 3.5}) == 3.5
    assert optimized_metric(cfg, {"val_loss": float("nan")}) == float("inf")  # NaN would crash Optuna
    assert optimized_metric(cfg, {"status": "failed"}) == float("inf")
    assert optimized_metric(OmegaConf.create({}), {"val_loss": 3.5}) is None


@pytest.mark.parametrize("damage", ["list", "string", "not utf-8", "overrides"])
def test_a_job_with_unreadable_files_is_reported_failed(damage, tmp_path):
    """results.json that is not a mapping or not UTF-8: that job is listed as failed with the reason, and the others
    are reported; an overrides.yaml that does not parse gives way to the overrides results.json records (each was a
    traceback that ended the report)."""
    base = ModelConfig.preset("tiny").to_dict()
    sweep = tmp_path / "sweep"
    _fake_job(sweep / "0", ["model.kv_lora_rank=16"], {**base, "kv_lora_rank": 16}, 3.5)
    _fake_job(sweep / "1", ["model.kv_lora_rank=32"], {**base, "kv_lora_rank": 32}, 3.4)
    bad = sweep / "1"
    if damage == "overrides":
        (bad / ".hydra" / "overrides.yaml").write_text("{{{: [\n")
    else:
        (bad / "results.json").write_bytes({"list": b"[1, 2]", "string": b'"done"', "not utf-8": b"\xff\xfe{"}[damage])
    report = write_report([sweep]).read_text()
    if damage == "overrides":  # the job's results.json records them too: still an ok job
        assert "Jobs: 2 (2 ok, 0 failed)" in report, report
    else:
        assert "Jobs: 2 (1 ok, 1 failed)" in report and "unreadable results.json" in report, report

"""LitDeepSeek pieces that need no Trainer: schedules, weight-decay groups, state-dict names, logger fallback."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from deepseek_mini.config import ModelConfig
from deepseek_mini.training.module import LitDeepSeek, expert_load_stats, lr_lambda, param_groups
from deepseek_mini.training.run import build_loggers

TINY = ModelConfig.preset("tiny", vocab_size=300, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                          moe_intermediate_size=16, n_routed_experts=4, kv_lora_rank=8).to_dict()


def test_warmup_cosine_schedule():
    f = lr_lambda({"name": "warmup_cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}, max_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # never a zero-lr first step
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_deepseek_step_schedule():
    f = lr_lambda({"name": "step", "warmup_steps": 0, "milestones": [0.8, 0.9], "gamma": 0.316}, max_steps=100)
    assert f(0) == 1.0 and f(79) == 1.0
    assert f(80) == pytest.approx(0.316) and f(90) == pytest.approx(0.316 ** 2)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown scheduler"):
        lr_lambda({"name": "wsd"}, 10)


def test_weight_decay_only_on_matrices():
    module = LitDeepSeek(TINY)
    decay, no_decay = param_groups(module.model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    experts = module.model.model.layers[1].mlp.experts.gate_up_proj
    assert any(p is experts for p in decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in module.model.parameters())


def test_compiled_module_keeps_plain_state_dict_names():
    module = LitDeepSeek(TINY, compile=True)
    module.configure_model()  # torch.compile is lazy: nothing is compiled until the first call
    assert module._forward is not module.model
    keys = list(module.state_dict())
    assert keys and all(k.startswith("model.") and "_orig_mod" not in k for k in keys)
    assert dict(module.hparams)["model_config"] == TINY and isinstance(module.hparams["model_config"], dict)


def test_loss_includes_aux_losses():
    module = LitDeepSeek(TINY)
    x = torch.randint(0, 300, (2, 16))
    out = module(x, x)
    assert out.aux_loss.item() > 0
    assert "expert_balance" in out.aux_losses


def test_expert_load_stats():
    even = expert_load_stats(torch.tensor([5.0, 5.0, 5.0, 5.0]))
    assert even["max_load"] == 1 and even["min_load"] == 1 and math.isclose(float(even["entropy"]), 1.0, rel_tol=1e-6)
    skew = expert_load_stats(torch.tensor([20.0, 0.0, 0.0, 0.0]))
    assert skew["max_load"] == 4 and skew["min_load"] == 0 and float(skew["entropy"]) < 1e-6


def test_wandb_online_without_key_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    cfg = OmegaConf.create({"task_name": "train", "logger": {"wandb": {
        "_target_": "lightning.pytorch.loggers.WandbLogger", "project": "p", "offline": False,
        "save_dir": str(tmp_path), "name": None, "group": None}}})
    with pytest.warns(UserWarning, match="logging offline"):
        (logger,) = build_loggers(cfg, tmp_path)
    assert logger._offline is True and logger._wandb_init["name"] == tmp_path.name

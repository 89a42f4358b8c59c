"""LitDeepSeek pieces that need no Trainer: schedules, weight-decay groups, state-dict names, logger fallback."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from deepseek_mini.config import ModelConfig
from deepseek_mini.optim.adamw import total_norm
from deepseek_mini.optim.clip import clip_in_fused_step
from deepseek_mini.optim.policy import param_groups
from deepseek_mini.optim.precision import bf16_weights_on
from deepseek_mini.optim.schedule import lr_lambda
from deepseek_mini.training.compile import parse_compile
from deepseek_mini.training.module import LitDeepSeek, expert_load_stats
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


@pytest.mark.parametrize(("value", "mode"), [(False, None), (None, None), ("false", None), (True, "default"),
                                             ("true", "default"), ("reduce-overhead", "reduce-overhead"),
                                             ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_compile_mode(value, mode):
    spec = parse_compile(value)
    assert (spec.mode if spec is not None else None) == mode


def test_compile_mode_rejects_unknown():
    with pytest.raises(ValueError, match="compile='fast'.*reduce-overhead"):
        parse_compile("fast")


def test_cuda_graph_mode_keeps_logged_values_out_of_graph_buffers():
    """Under reduce-overhead every value that outlives the step is a copy, never the forward's own output."""
    module = LitDeepSeek(TINY, compile="reduce-overhead")
    assert module._cudagraphs and not LitDeepSeek(TINY, compile=True)._cudagraphs
    t = torch.ones(3)
    kept = module._keep(t)
    assert torch.equal(kept, t) and kept.data_ptr() != t.data_ptr()
    plain = LitDeepSeek(TINY)._keep(t)
    assert plain.data_ptr() == t.data_ptr()  # no copies when there are no CUDA graphs


@pytest.mark.parametrize("grad_std", [5.0, 1e-3])  # clipped, and below max_norm (left alone)
def test_clipping_folded_into_fused_adamw_matches_clip_grad_norm(grad_std):
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(40, 24)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(24))]
    new = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, fused=True)
    opt_new = torch.optim.AdamW(new, lr=1e-2, fused=True)
    for _ in range(3):
        for p, q in zip(ref, new):
            g = torch.randn_like(p) * grad_std
            p.grad, q.grad = g.clone(), g.clone()
        expected = torch.nn.utils.clip_grad_norm_(ref, 1.0, foreach=True)
        opt_ref.step()
        norm = clip_in_fused_step(opt_new, new, 1.0)
        opt_new.step()
        opt_new.grad_scale = None
        assert torch.allclose(norm, expected)
        for p, q in zip(ref, new):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert (expected > 1.0) == (grad_std > 1), "the case is meant to clip (or not)"


def test_clipping_not_folded_into_unfused_optimizer():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = torch.optim.AdamW([p], fused=False)
    assert clip_in_fused_step(opt, [p], 1.0) is None and getattr(opt, "grad_scale", None) is None


def test_total_norm_is_fp32_over_mixed_dtypes():
    torch.manual_seed(0)
    grads = [torch.randn(300, 7), torch.randn(5000).bfloat16() * 3, torch.randn(11).bfloat16()]
    expected = torch.cat([g.double().flatten() for g in grads]).norm()
    norm = total_norm(grads)
    assert norm.dtype == torch.float32
    assert abs(float(norm) - float(expected)) < 1e-5 * float(expected)  # a bf16 norm would be ~4e-3 off


def test_bf16_weights_only_where_the_masters_can_live():
    from deepseek_mini.optim.adamw import TritonAdamW

    triton_opt = TritonAdamW([torch.nn.Parameter(torch.ones(2))])
    where = dict(on_cuda=True, bf16_autocast=True, single_device=True)
    assert bf16_weights_on("auto", triton_opt, **where) and bf16_weights_on(True, triton_opt, **where)
    assert not bf16_weights_on(False, triton_opt, **where)
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    assert not bf16_weights_on("auto", plain, **where)
    assert not bf16_weights_on("auto", triton_opt, **{**where, "single_device": False})  # DDP / FSDP
    assert not bf16_weights_on("auto", triton_opt, **where, accumulate=4)  # bf16 sums over micro-batches
    with pytest.raises(ValueError, match="needs a CUDA device, trainer.precision=bf16-mixed, "
                                         "trainer.accumulate_grad_batches=1"):
        bf16_weights_on(True, triton_opt, on_cuda=False, bf16_autocast=False, single_device=True, accumulate=2)
    with pytest.raises(ValueError, match="optim.bf16_weights='yes'"):
        bf16_weights_on("yes", triton_opt, **where)


def test_bf16_weights_are_the_matrices_but_the_embedding():
    from deepseek_mini.optim.precision import bf16_weight_parameters

    for tie in (False, True):
        model = LitDeepSeek({**TINY, "tie_word_embeddings": tie}).model
        chosen = {id(p) for p in bf16_weight_parameters(model)}
        names = {n for n, p in model.named_parameters() if id(p) in chosen}
        expected = {n for n, p in model.named_parameters() if p.ndim >= 2} - {"model.embed_tokens.weight"}
        if tie:
            expected.discard("lm_head.weight")  # it is the embedding: stays fp32
        assert names == expected, names ^ expected
        assert any(".experts." in n for n in names) and any(n.endswith("gate.weight") for n in names)
        assert len(chosen) == len(bf16_weight_parameters(model))  # no parameter twice


def test_bf16_weights_checkpoint_holds_the_fp32_masters(monkeypatch):
    """During fit the weight matrices are bf16 copies; checkpoints get the fp32 masters, and after fit the
    parameters are fp32 again with the master values. (The kernel itself: tests/test_adamw.py.)"""
    from deepseek_mini.kernels import runtime
    from deepseek_mini.optim import adamw
    from deepseek_mini.optim.precision import bf16_weight_parameters

    if runtime.triton is None:
        pytest.skip("Triton is not installed (CPU-only torch)")
    monkeypatch.setattr(runtime, "INTERPRET", True)  # lets CPU tensors take masters; no kernel runs here
    module = LitDeepSeek(TINY)
    experts = bf16_weight_parameters(module.model)
    before = {id(p): p.detach().clone() for p in experts}
    opt = adamw.TritonAdamW(module.parameters())
    opt.keep_fp32_masters(experts)
    module._master_opt = opt
    with torch.no_grad():  # stands in for a few optimizer steps: the masters move, the bf16 copies follow
        for p, master in opt.masters.items():
            master.add_(1e-3)
            p.copy_(master)
    assert all(p.dtype == torch.bfloat16 for p in experts)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    names = {p: n for n, p in module.named_parameters()}
    for p in experts:
        saved = checkpoint["state_dict"][names[p]]
        assert saved.dtype == torch.float32 and torch.equal(saved, before[id(p)] + 1e-3)
    module.on_fit_end()
    assert all(p.dtype == torch.float32 and torch.equal(p, before[id(p)] + 1e-3) for p in experts)
    assert not opt.masters and module._master_opt is None
    # a fit that raised never reached on_fit_end: the next configure_optimizers starts from the masters
    opt.keep_fp32_masters(experts)
    module._master_opt = opt
    module._use_bf16_weights(torch.optim.AdamW(module.parameters()))  # no Trainer, CPU: stays off
    assert all(p.dtype == torch.float32 and torch.equal(p, before[id(p)] + 1e-3) for p in experts)
    assert module._master_opt is None


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


def _fit_three_steps(fused: bool, clip: float) -> dict[str, torch.Tensor]:
    import lightning as L

    torch.manual_seed(0)
    data = torch.randint(0, 300, (6, 2, 17))
    loader = torch.utils.data.DataLoader([(b[:, :-1], b[:, 1:]) for b in data], batch_size=None)
    module = LitDeepSeek(TINY, optim={"lr": 1e-2, "fused": fused}, max_steps=3)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, gradient_clip_val=clip, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    opt = trainer.optimizers[0]
    assert getattr(opt, "grad_scale", None) is None, "the folded clip scale must not leak into the next step"
    return {k: v.clone() for k, v in module.model.state_dict().items()}


def test_trainer_clipping_through_fused_adamw_matches_plain_clipping():
    """Through Lightning: fused AdamW with clipping folded into its step == unfused AdamW + clip_grad_norm_."""
    fused, plain = _fit_three_steps(True, 0.05), _fit_three_steps(False, 0.05)
    unclipped = _fit_three_steps(False, 0.0)
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], rtol=0, atol=1e-5)
    assert any(not torch.allclose(plain[k], unclipped[k], atol=1e-4) for k in plain), "clipping must be active"


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_an_inf_gradient_norm_stops_the_run(clip):
    """DDP with per-block CUDA graphs on two H200s produced an inf gradient norm from step 19 on with finite
    losses: clipping by it zeroed every update and the run ended "completed" at loss 8.4. The guard now stops
    at the first check after such a step, with clipping (the norm of every step) and without (logged steps)."""
    import lightning as L

    from deepseek_mini.training.errors import NonFiniteLossError
    from deepseek_mini.training.guards import NonFiniteLossGuard

    class InfGradAtStep3(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    torch.manual_seed(0)
    data = torch.randint(0, 300, (6, 2, 17))
    loader = torch.utils.data.DataLoader([(b[:, :-1], b[:, 1:]) for b in data], batch_size=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, gradient_clip_val=clip, logger=False, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[InfGradAtStep3(), NonFiniteLossGuard()])
    module = LitDeepSeek(TINY, optim={"lr": 1e-2}, max_steps=6, log_every_n_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"^non-finite gradient norm \(inf\) at step 3; training stopped"):
        trainer.fit(module, train_dataloaders=loader)


def test_progress_bar_shows_the_loss_without_a_per_step_conversion():
    """train/loss is not a prog_bar metric (Lightning would .item() it after every batch, a host sync per
    step on a GPU); callbacks.ProgressBar reads it from callback_metrics every `every_n_steps` instead."""
    import lightning as L

    from deepseek_mini.training.callbacks import ProgressBar

    torch.manual_seed(0)
    data = torch.randint(0, 300, (6, 2, 17))
    loader = torch.utils.data.DataLoader([(b[:, :-1], b[:, 1:]) for b in data], batch_size=None)
    seen = []

    class Spy(ProgressBar):
        def get_metrics(self, trainer, pl_module):
            items = super().get_metrics(trainer, pl_module)
            seen.append((trainer.global_step, items.get("loss")))  # train/loss, labelled "loss" in the bar
            return items

    def fit(every_n_steps):
        seen.clear()
        trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            callbacks=[Spy(every_n_steps=every_n_steps)])
        torch.manual_seed(0)
        trainer.fit(LitDeepSeek(TINY, optim={"lr": 1e-2}, max_steps=6), train_dataloaders=loader)
        assert not any(k.startswith("train/") for k in trainer.progress_bar_metrics), trainer.progress_bar_metrics
        shown = [v for _, v in seen if v is not None]
        assert shown and all(isinstance(v, str) and float(v) > 0 for v in shown)
        return len(set(shown))

    assert fit(1) >= 5  # a new loss read after every batch
    assert fit(3) <= 2  # read at most once every 3 steps


def test_validation_before_fit_leaves_the_weights_on_their_device(monkeypatch):
    """Lightning's teardown after trainer.validate() moves the model to the CPU (fit() then moves it back: a 2.8 GB
    round trip before a `small` run's first step). Inside kept_on_device(), as train.validate_before_fit runs it,
    the module stays put; outside it Lightning's move happens as before."""
    import lightning as L
    from lightning.fabric.utilities.device_dtype_mixin import _DeviceDtypeModuleMixin

    moves = []
    real_cpu = _DeviceDtypeModuleMixin.cpu
    monkeypatch.setattr(_DeviceDtypeModuleMixin, "cpu", lambda self: moves.append(type(self).__name__) or real_cpu(self))
    data = torch.randint(0, 300, (2, 2, 17))
    loader = torch.utils.data.DataLoader([(b[:, :-1], b[:, 1:]) for b in data], batch_size=None)
    module = LitDeepSeek(TINY, max_steps=1)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with module.kept_on_device():
        trainer.validate(module, dataloaders=loader, verbose=False)
    assert moves == [] and not module._stay_on_device
    trainer.validate(module, dataloaders=loader, verbose=False)
    assert moves == ["LitDeepSeek"]  # Lightning's teardown, outside the block

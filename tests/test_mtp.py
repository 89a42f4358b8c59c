"""Multi-token prediction (model/mtp.py): D = 0 is the plain model, shapes, causality, the loss and its
decomposition, gradients, parameter counts, the training module's logging, and the compiled CPU path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_trusted_cpu_compile
from model_helpers import SMALL_MODEL

from deepseek_mini.config import ConfigError, ModelConfig, count_parameters
from deepseek_mini.model.mtp import mtp_hidden_states
from deepseek_mini.model.transformer import DeepSeekV2


def build(d: int, seed: int = 0, **changes) -> DeepSeekV2:
    torch.manual_seed(seed)
    return DeepSeekV2(ModelConfig.from_dict({**SMALL_MODEL, "num_nextn_predict_layers": d, **changes}))


def batch(seed: int = 1, B: int = 2, T: int = 12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, SMALL_MODEL["vocab_size"], (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def test_d0_is_the_plain_model_and_mtp_leaves_the_trunk_as_it_was():
    plain, with_mtp = build(0), build(2)
    assert plain.mtp is None and not any(k.startswith("mtp") for k in plain.state_dict())
    main = {k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")}
    assert main.keys() == plain.state_dict().keys()
    # the same seed gives the trunk the same initial weights (MTP modules are built off the global RNG)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in main.items())
    x, y = batch()
    a = plain(x, labels=y, return_logits=False)
    b = with_mtp(x, labels=y, return_logits=False)
    assert a.mtp_loss is None and a.mtp_losses == []
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)  # the main loss is untouched
    assert b.mtp_loss is not None and len(b.mtp_losses) == 2
    # the trunk's aux losses are the same; the MTP blocks' MoE adds its own balance loss on top
    assert b.aux_loss > a.aux_loss
    # inference ignores MTP: logits (no labels) and the no-grad loss are the plain model's
    with torch.no_grad():
        torch.testing.assert_close(with_mtp(x).logits, plain(x).logits, rtol=0, atol=0)
        out = with_mtp(x, labels=y)
        assert out.mtp_loss is None
        torch.testing.assert_close(out.loss, plain(x, labels=y).loss, rtol=0, atol=0)


def test_shapes_and_names_follow_deepseek_v3():
    model = build(2)
    names = set(model.state_dict())
    for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "block.self_attn.kv_b_proj.weight", "block.mlp.gate.weight", "block.input_layernorm.weight"):
        assert f"mtp.1.{part}" in names
    assert model.mtp[0].eh_proj.weight.shape == (32, 64)
    x, y = batch(T=10)
    h0, _, _ = model.hidden_states(x)
    hs = [h for h, _ in mtp_hidden_states(model.mtp, model.model.embed_tokens, h0, y)]
    assert [tuple(h.shape) for h in hs] == [(2, 9, 32), (2, 8, 32)]
    dense = build(1, n_routed_experts=None, first_k_dense_replace=0)
    assert not dense.mtp[0].block.is_moe  # MTP's block is dense or MoE by the trunk's rule


def test_mtp_is_causal():
    """Depth k at position i reads tokens up to t_{i+k} only: changing token j leaves positions i < j - k as
    they were and changes some position at or after it."""
    model = build(2).double()
    x, y = batch(T=12)
    tokens = torch.cat([x, y[:, -1:]], 1)  # t_0..t_12; y = tokens[:, 1:]

    def depth_hidden(tok):
        h0, _, _ = model.hidden_states(tok[:, :-1])
        return [h for h, _ in mtp_hidden_states(model.mtp, model.model.embed_tokens, h0, tok[:, 1:])]

    base = depth_hidden(tokens)
    for j in (4, 8):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % SMALL_MODEL["vocab_size"]
        after = depth_hidden(changed)
        for k, (h, h2) in enumerate(zip(base, after), start=1):
            first = j - k  # the first position whose input token t_{i+k} is t_j
            torch.testing.assert_close(h2[:, :first], h[:, :first], rtol=0, atol=1e-12)  # fp64 rounding
            assert (h2[:, first] - h[:, first]).abs().max() > 1e-6


def test_loss_decomposition_and_gradients():
    model = build(2, mtp_loss_weight=0.5).double()
    x, y = batch(T=12)
    y = y.clone()
    y[0, 5] = -100  # an ignored target: no loss there, and no loss where it would be an MTP input
    out = model(x, labels=y, return_logits=False)
    # recomputed by hand with F.cross_entropy over the materialised logits
    h, _, _ = model.hidden_states(x)
    expected = []
    for k, module in enumerate(model.mtp, start=1):
        n = x.shape[1] - k
        tok = y[:, k - 1:k - 1 + n]
        h, _, _ = module(h[:, :n], model.model.embed_tokens(tok.clamp_min(0)), torch.arange(n))
        logits = model.lm_head(module.shared_head.norm(h))
        target = y[:, k:k + n].masked_fill(tok == -100, -100)
        expected.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100))
    for got, want in zip(out.mtp_losses, expected):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out.mtp_loss, 0.5 / 2 * (expected[0] + expected[1]))

    model.zero_grad()
    out.mtp_loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("mtp.") and "experts" not in name and "mlp.gate" not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for shared in (model.model.embed_tokens.weight, model.lm_head.weight):
        assert shared.grad.abs().sum() > 0  # the embedding and the head are shared with the main model
    assert model.model.layers[0].self_attn.kv_b_proj.weight.grad.abs().sum() > 0  # through h_0 into the trunk


def test_training_step_adds_and_logs_the_mtp_loss():
    from deepseek_mini.training.module import LitDeepSeek

    torch.manual_seed(0)
    module = LitDeepSeek({**SMALL_MODEL, "num_nextn_predict_layers": 2, "mtp_loss_weight": 0.3})
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    module.__dict__["_trainer"] = type("T", (), {"global_step": 1})()  # not a log_every step: no router stats
    x, y = batch(T=12)
    torch.manual_seed(3)
    loss = module.training_step((x, y), 0)
    torch.manual_seed(3)
    out = module.model(x, labels=y, return_logits=False)
    torch.testing.assert_close(loss, out.loss + out.aux_loss + out.mtp_loss)
    torch.testing.assert_close(logged["train/mtp_loss_1"], out.mtp_losses[0])
    torch.testing.assert_close(logged["train/mtp_loss_2"], out.mtp_losses[1])
    torch.testing.assert_close(logged["train/mtp_loss"], (out.mtp_losses[0] + out.mtp_losses[1]) / 2)
    torch.testing.assert_close(loss, logged["train/loss"] + logged["train/aux_loss"] + 0.3 * logged["train/mtp_loss"])


@pytest.mark.parametrize("changes", [{}, {"n_routed_experts": None, "first_k_dense_replace": 0}])
def test_parameter_counts_report_main_and_mtp_apart(changes):
    model = build(2, **changes)
    counts, plain = count_parameters(model.config), count_parameters(build(0, **changes).config)
    mtp_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert counts.mtp == mtp_params > 0
    assert (counts.total, counts.active) == (plain.total, plain.active)  # "active" is the main model's
    assert counts.total + counts.mtp == sum(p.numel() for p in model.parameters())
    if model.config.is_moe:
        bank = sum(m.block.mlp.experts.gate_up_proj.numel() + m.block.mlp.experts.down_proj.numel()
                   for m in model.mtp)
        cfg = model.config
        assert counts.mtp_active == mtp_params - bank * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
    else:
        assert counts.mtp_active == counts.mtp


@pytest.mark.parametrize("field, value", [("num_nextn_predict_layers", -1), ("num_nextn_predict_layers", 1.5),
                                          ("num_nextn_predict_layers", True), ("mtp_loss_weight", -0.1),
                                          ("mtp_loss_weight", float("nan"))])
def test_bad_mtp_settings_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"ModelConfig.{field}="):
        ModelConfig.from_dict({**SMALL_MODEL, field: value})


def test_sequence_shorter_than_the_depths_is_refused():
    model = build(2)
    x = torch.randint(0, 64, (1, 2))
    with pytest.raises(ValueError, match="needs sequences longer than 2"):
        model(x, labels=x, return_logits=False)


@needs_trusted_cpu_compile
def test_compiled_forward_backward_with_mtp_equals_eager():
    """compile=true compiles the whole DeepSeekV2, MTP included (aot_eager, as tests/test_cpu_compile.py)."""
    eager = build(1, num_hidden_layers=1, first_k_dense_replace=0)  # one MoE layer in the trunk, one in MTP
    x, y = batch(T=8)

    def loss_and_grads(model):
        eager.zero_grad(set_to_none=True)
        out = model(x, labels=y, return_logits=False)
        total = out.loss + out.mtp_loss
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in eager.named_parameters() if p.grad is not None}

    loss_e, grads_e = loss_and_grads(eager)
    torch._dynamo.reset()
    loss_c, grads_c = loss_and_grads(torch.compile(eager, backend="aot_eager", dynamic=False))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and any(n.startswith("mtp.0.eh_proj") for n in grads_c)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(("overrides", "line"), [
    (["model.num_nextn_predict_layers=-1"],
     "error: model.num_nextn_predict_layers=-1: must be an integer >= 0 (0 = no multi-token prediction)"),
    (["model.mtp_loss_weight=-0.3"], "error: model.mtp_loss_weight=-0.3: must be a finite number >= 0"),
    (["model.num_nextn_predict_layers=4", "data.seq_len=4"],
     "error: model.num_nextn_predict_layers=4: must be < data.seq_len=4 (each MTP depth predicts one token "
     "further ahead)"),
])
def test_bad_mtp_config_is_one_line_error_before_data_prep(overrides, line, tmp_path, capsys, monkeypatch):
    from test_reliability import run_inprocess

    cache = tmp_path / "cache"
    code, out = run_inprocess("train.py", [*overrides, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'r'}",
                                           "logger=none"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out
    assert [x for x in out.splitlines() if x.startswith("error:")] == [line]
    assert not cache.exists()


def test_flops_per_token_count_the_mtp_modules():
    """MFU of an MTP run counts the MTP modules' matmuls (incl. one more pass through the shared head) and
    attention; without MTP the number is unchanged."""
    from deepseek_mini.config import flops_per_token

    model = build(1)
    cfg, plain = model.config, build(0).config
    matmul = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp.") and p.dim() >= 2
                 and "mlp.experts." not in n)
    experts = model.mtp[0].block.mlp.experts
    matmul += (experts.gate_up_proj.numel() + experts.down_proj.numel()) * cfg.num_experts_per_tok // cfg.n_routed_experts
    matmul += cfg.vocab_size * cfg.hidden_size  # the shared head, once more
    attn = 6 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 64
    assert flops_per_token(cfg, 64) - flops_per_token(plain, 64) == 6 * matmul + attn

"""Hugging Face interop: export -> transformers logits, import <- transformers / hub layouts, refusals.

Tiny random models only (hidden 64, 3 layers, 8 experts top-2, vocab 128); transformers is a dev
dependency and nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_mini import from_pretrained
from deepseek_mini.config import ModelConfig
from deepseek_mini.interop.hf import (
    HFExportError,
    HFImportError,
    config_from_hf,
    config_to_hf,
    export_hf,
    save_pretrained,
    state_dict_from_hf,
    state_dict_to_hf,
)
from deepseek_mini.model import DeepSeekV2

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96, moe_intermediate_size=32,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
            max_position_embeddings=64, initializer_range=0.1)  # wide init: routing depends on the input
LITE_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


def cfg_of(**kw) -> ModelConfig:
    return ModelConfig(**{**BASE, **kw})


def make_model(cfg: ModelConfig, seed: int = 0) -> DeepSeekV2:
    torch.manual_seed(seed)
    model = DeepSeekV2(cfg).eval()
    with torch.no_grad():  # norm weights away from 1 so a wrong eps / missing norm shows
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    return model


def tokens(cfg: ModelConfig, seed: int = 1, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def hf_logits(path, x) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(x).logits


def ours_logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


# ---------------------------------------------------------------------- export round trips
ROUND_TRIPS = {
    "lite_like": dict(q_lora_rank=None),
    "q_lora": dict(q_lora_rank=24),
    "group_limited": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0,
                          q_lora_rank=24),
    "all_moe_tied": dict(first_k_dense_replace=0, tie_word_embeddings=True),
    "untied_fk1_capacity": dict(first_k_dense_replace=1, capacity_factor=1.25, aux_loss_alpha=0.01,
                                device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02, seq_aux=False),
    "dense": dict(n_routed_experts=None, first_k_dense_replace=0, tie_word_embeddings=True),
    "yarn_lite": dict(rope_scaling=LITE_YARN),
    # mscale without mscale_all_dim: transformers would infer another cos/sin factor; attention_factor pins it
    "yarn_mscale_only": dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                           "mscale": 0.5}),
    # exact mappings of settings transformers ignores: identity renormalisation, same MoE layers
    "norm_topk_all_experts": dict(norm_topk_prob=True, num_experts_per_tok=8),
    "moe_layer_freq_same_layers": dict(num_hidden_layers=3, first_k_dense_replace=2, moe_layer_freq=2),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_export_matches_transformers_and_reloads(name, tmp_path):
    cfg = cfg_of(**ROUND_TRIPS[name])
    model = make_model(cfg)
    out = tmp_path / "hf"
    written = save_pretrained(model, out)
    assert {p.name for p in written} == {"config.json", "model.safetensors"}
    x = tokens(cfg)
    ours = ours_logits(model, x)
    diff = (ours - hf_logits(out, x)).abs().max().item()
    assert diff <= TOL, f"{name}: max abs logit difference {diff}"

    back = from_pretrained(out)
    assert back.config == config_from_hf(out / "config.json")
    assert torch.equal(ours_logits(back, x), ours)
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)


def test_config_json_is_explicit_and_hub_style(tmp_path):
    cfg = cfg_of(q_lora_rank=24, tie_word_embeddings=True)
    d = config_to_hf(cfg)
    assert d["model_type"] == "deepseek_v2" and d["architectures"] == ["DeepseekV2ForCausalLM"]
    for key in ("q_lora_rank", "kv_lora_rank", "n_group", "topk_group", "topk_method", "num_experts_per_tok",
                "n_shared_experts", "first_k_dense_replace", "norm_topk_prob", "routed_scaling_factor",
                "rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings", "aux_loss_alpha", "seq_aux",
                "scoring_func", "moe_layer_freq", "num_key_value_heads", "head_dim"):
        assert key in d, key
    assert d["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    sd = state_dict_to_hf(make_model(cfg))
    assert "lm_head.weight" not in sd  # tied: transformers re-ties it
    assert sd["model.layers.1.mlp.experts.7.gate_proj.weight"].shape == (32, 64)
    assert sd["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (64, 32)
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in sd)


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=24, capacity_factor=2.0, seq_aux=False),
                                dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)])
def test_config_round_trip_is_lossless(kw):
    cfg = cfg_of(**kw)
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg


# ---------------------------------------------------------------------- import: hub and transformers layouts
def lite_style_config(**kw) -> dict:
    """Key for key like deepseek-ai/DeepSeek-V2-Lite's config.json, at a tiny shape."""
    d = {
        "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                     "AutoModel": "modeling_deepseek.DeepseekV2Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"},
        "aux_loss_alpha": 0.001, "bos_token_id": 100000 % 128, "eos_token_id": 100001 % 128,
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.1,
        "intermediate_size": 96, "kv_lora_rank": 16, "max_position_embeddings": 64, "model_type": "deepseek_v2",
        "moe_intermediate_size": 32, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 8,
        "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 4, "num_experts_per_tok": 2,
        "num_hidden_layers": 3, "num_key_value_heads": 4, "pretraining_tp": 1, "q_lora_rank": None,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "rms_norm_eps": 1e-06, "rope_scaling": dict(LITE_YARN),
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "float32",
        "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 16, "vocab_size": 128,
    }
    d.update(kw)
    return d


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                             topk_group=2, routed_scaling_factor=2.0)])
def test_hub_lite_layout_loads_with_same_logits(kw, tmp_path):
    from safetensors import safe_open

    d = lite_style_config(**kw)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**d)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")  # the hub's per-expert names, sharded like the hub's
    (tmp_path / "config.json").write_text(json.dumps(d, indent=2))  # replace with the hub-style file
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in index and len(set(index.values())) > 1
    with safe_open(str(tmp_path / index["model.layers.1.mlp.experts.3.up_proj.weight"]), "pt") as f:
        assert "model.layers.1.mlp.experts.3.up_proj.weight" in f.keys()
    ours = from_pretrained(tmp_path)
    assert ours.config.rope_scaling["factor"] == 40 and ours.config.q_lora_rank == d["q_lora_rank"]
    x = tokens(ours.config)
    with torch.no_grad():
        ref = hf(x).logits
    assert (ours_logits(ours, x) - ref).abs().max().item() <= TOL
    # transformers reads the hub-style file the same way (built-in class: auto_map needs trust_remote_code)
    assert (hf_logits(tmp_path, x) - ref).abs().max().item() <= TOL


def test_fused_v5_state_dict_is_accepted():
    d = lite_style_config(rope_scaling=None)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**d)).eval()
    sd = hf.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd  # v5 in memory: fused experts
    cfg = config_from_hf(d)
    ours = DeepSeekV2(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(sd, cfg))
    x = tokens(cfg)
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max().item() <= TOL


# ---------------------------------------------------------------------- refusals
EXPORT_REFUSALS = {
    "attention": [dict(attention="mha"), dict(attention="gqa", num_key_value_heads=2), dict(attention="mqa")],
    "scoring_func": [dict(scoring_func="sigmoid", norm_topk_prob=True)],
    "bias_update_speed": [dict(bias_update_speed=0.001)],
    "norm_topk_prob": [dict(norm_topk_prob=True)],
    "moe_layer_freq": [dict(num_hidden_layers=4, moe_layer_freq=2)],
    "n_shared_experts": [dict(n_shared_experts=0)],
}


@pytest.mark.parametrize("field,kw", [(f, kw) for f, kws in EXPORT_REFUSALS.items() for kw in kws])
def test_export_refuses_what_transformers_cannot_express(field, kw, tmp_path):
    cfg = cfg_of(**kw)
    with pytest.raises(HFExportError, match=field):
        config_to_hf(cfg)
    with pytest.raises(HFExportError, match=field):
        export_hf(DeepSeekV2(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything


@pytest.mark.parametrize("field,kw", [
    ("model_type", dict(model_type="deepseek_v3")),
    ("topk_method", dict(topk_method="noaux_tc")),
    ("scoring_func", dict(scoring_func="sigmoid")),
    ("norm_topk_prob", dict(norm_topk_prob=True)),
    ("moe_layer_freq", dict(num_hidden_layers=4, moe_layer_freq=2)),
    ("rope", dict(rope_scaling={"type": "linear", "factor": 2.0})),
])
def test_import_refuses_ambiguous_configs(field, kw):
    with pytest.raises(HFImportError, match=field):
        config_from_hf(lite_style_config(**kw))


def test_import_v5_rope_parameters():
    d = lite_style_config(rope_scaling=None, rope_theta=None)
    d.pop("rope_scaling"), d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    cfg = config_from_hf(d)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling is None


# ---------------------------------------------------------------------- tokenizer + script
def train_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 5
                            + ["deepseek mini exports to hugging face", "mixture of experts, latent attention"],
                            trainer=trainer)
    tok.save(str(path))
    return tok


def write_lightning_ckpt(path: Path, cfg: ModelConfig, seed: int = 0) -> DeepSeekV2:
    model = make_model(cfg, seed)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model_config": cfg.to_dict()}}, path)
    return model


def test_tokenizer_export_loads_in_autotokenizer(tmp_path):
    tok = train_tokenizer(tmp_path / "tokenizer.json")
    cfg = cfg_of(vocab_size=tok.get_vocab_size())
    out = tmp_path / "hf"
    save_pretrained(make_model(cfg), out, tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "the lazy fox exports latent experts<|endoftext|>ünïcode ✓"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tok.token_to_id("<|endoftext|>") == 0
    assert hf_tok.decode(tok.encode("quick brown dog").ids) == "quick brown dog"
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "export_hf.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_export_script_end_to_end(tmp_path):
    tok = train_tokenizer(tmp_path / "tokenizer.json")
    cfg = cfg_of(vocab_size=tok.get_vocab_size(), q_lora_rank=24)
    model = write_lightning_ckpt(tmp_path / "last.ckpt", cfg)
    out = tmp_path / "hf"
    r = run_script(tmp_path / "last.ckpt", out)
    assert r.returncode == 0, r.stderr
    assert "verdict: OK" in r.stdout and "tokenizer.json" in r.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        p.name for p in out.iterdir())
    # load_checkpoint (used by eval.py / generate.py) takes the HF directory like a checkpoint
    from deepseek_mini.checkpoint import load_checkpoint

    loaded = load_checkpoint(out)
    x = tokens(cfg)
    assert torch.equal(ours_logits(loaded.model, x), ours_logits(model, x))
    assert loaded.tokenizer is not None and loaded.tokenizer.get_vocab_size() == tok.get_vocab_size()


def test_export_script_refuses_cleanly(tmp_path):
    write_lightning_ckpt(tmp_path / "mha.ckpt", cfg_of(attention="mha"))
    r = run_script(tmp_path / "mha.ckpt", tmp_path / "out", "--no-verify")
    assert r.returncode == 2
    assert "attention" in r.stderr and "MLA-only" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()

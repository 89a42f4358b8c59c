"""MTP modules through the Hugging Face export: stored as DeepSeek-V3 stores them (extra layers
`model.layers.{num_hidden_layers + k}`), ignored by transformers' DeepseekV2 (the main model's logits are ours),
restored by our loader."""

from __future__ import annotations

import json

import pytest
import torch
from test_hf import cfg_of, make_model, ours_logits, tokens

from deepseek_mini.interop.hf import HFImportError, from_pretrained, read_hf_state_dict, save_pretrained

transformers = pytest.importorskip("transformers")


def test_mtp_export_round_trip(tmp_path):
    cfg = cfg_of(num_nextn_predict_layers=2, mtp_loss_weight=0.1)
    model = make_model(cfg)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 2 and config["num_hidden_layers"] == 3
    names = set(read_hf_state_dict(tmp_path))
    for k in (3, 4):  # DeepseekV3's layout: enorm / hnorm / eh_proj / shared_head.norm + a block, per module
        assert {f"model.layers.{k}.{p}" for p in ("enorm.weight", "hnorm.weight", "eh_proj.weight",
                                                   "shared_head.norm.weight", "self_attn.kv_b_proj.weight",
                                                   "mlp.experts.0.gate_proj.weight")} <= names
    assert not any(n.startswith("mtp.") for n in names)

    # transformers builds 3 layers, reports the MTP weights as unexpected and drops them; the logits are ours
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                                 output_loading_info=True)
    assert len(hf.model.layers) == 3 and not info["missing_keys"]
    assert {k.split(".")[2] for k in info["unexpected_keys"]} == {"3", "4"}
    x = tokens(cfg)
    with torch.no_grad():
        assert (hf(x).logits - ours_logits(model, x)).abs().max() <= 1e-4

    back = from_pretrained(tmp_path)  # ours -> HF -> ours keeps the MTP weights
    assert back.config == cfg
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)


def test_v3_style_copies_of_the_shared_weights(tmp_path):
    """DeepSeek-V3's release repeats the embedding and head in each MTP layer: accepted when equal, else refused."""
    from safetensors.torch import save_file

    cfg = cfg_of(num_nextn_predict_layers=1, tie_word_embeddings=False)
    model = make_model(cfg)
    save_pretrained(model, tmp_path)
    sd = read_hf_state_dict(tmp_path)
    sd["model.layers.3.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    sd["model.layers.3.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    save_file(sd, str(tmp_path / "model.safetensors"))
    assert torch.equal(from_pretrained(tmp_path).mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)
    sd["model.layers.3.shared_head.head.weight"] += 1
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFImportError, match="differs from the main model's"):
        from_pretrained(tmp_path)


def test_mtp_layers_without_the_config_field_are_refused(tmp_path):
    model = make_model(cfg_of(num_nextn_predict_layers=1))
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFImportError, match="unexpected"):
        from_pretrained(tmp_path)

"""Shared by the model tests: a model config small enough to build and run in milliseconds, and a reference RoPE."""

import torch

# dims multiples of 4 so fp32 grouped_mm strides are 16-byte aligned
SMALL_MODEL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=16,
                   qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48,
                   moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                   first_k_dense_replace=1, max_position_embeddings=64)


def write_tiny_checkpoint(folder, texts, **config_fields):
    """A hand-made Lightning-style checkpoint of a tiny MLA model (`folder/last.ckpt`) with a byte-level BPE
    tokenizer.json trained on `texts` beside it, as a run's checkpoint directory holds them.
    Returns (path, model, tokenizer)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from deepseek_mini.config import ModelConfig
    from deepseek_mini.model.transformer import DeepSeekV2

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) * 5, trainer)
    cfg = ModelConfig.preset("tiny", **{"vocab_size": 320, "max_position_embeddings": 64, "hidden_size": 64,
                                        "num_hidden_layers": 2, "intermediate_size": 128, **config_fields})
    torch.manual_seed(0)
    model = DeepSeekV2(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model_config": cfg.to_dict()}}, folder / "last.ckpt")
    tok.save(str(folder / "tokenizer.json"))
    return folder / "last.ckpt", model, tok


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, H, R] with pairs (2i, 2i+1) rotated at each row's own position positions[b], from RotaryEmbedding's
    tables [positions, R / 2], in x's dtype: the reference for the decode kernel rotating q's rope part itself."""
    c, s = cos[positions][:, None].to(x.dtype), sin[positions][:, None].to(x.dtype)  # [B, 1, R / 2]
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


def write_training_checkpoint(path, step: int = 1, **extra) -> None:
    """The smallest file train.py's resume accepts (resume.verify_training_checkpoint): Lightning's version, the
    step, an optimizer state and a state_dict of tensors (here none: no model config is recorded, so no weights are
    compared). For the tests of which checkpoint a resume picks, not of what it restores."""
    import torch

    torch.save({"pytorch-lightning_version": "2.6.6", "global_step": step, "epoch": 0, "state_dict": {},
                "optimizer_states": [{"state": {}, "param_groups": []}], **extra}, path)

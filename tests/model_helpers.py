"""Shared by the model tests: a model config small enough to build and run in milliseconds."""

# dims multiples of 4 so fp32 grouped_mm strides are 16-byte aligned
SMALL_MODEL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=16,
                   qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48,
                   moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                   first_k_dense_replace=1, max_position_embeddings=64)

"""Training throughput: deepseek-mini against transformers' DeepseekV2ForCausalLM and torchtitan's DeepSeek-V3,
same shape, same GPU.

    python scripts/bench/bench_train.py                       # every variant below, `small` shape, 16 x 1024
    python scripts/bench/bench_train.py --variants ours,hf_grouped_bf16_compile --steps 30
    python scripts/bench/bench_train.py --variants ours@default,ours@reduce-overhead --profile-steps 3
    python scripts/bench/bench_train.py --variants ours,ours_dense,hf_grouped_bf16_compile,tt_deepseek_v3
    python scripts/bench/bench_train.py --variants ours,ours --compile-scope regional   # or ours@regional

A variant may name a torch.compile mode after "@" (default, reduce-overhead = + CUDA graphs,
max-autotune-no-cudagraphs, max-autotune); without one, --compile-mode applies to our compiled variants.
--compile-scope picks what of ours is compiled: the whole model (full) or each transformer block once per
block kind (regional, the training config's `compile=regional`); a variant may say so after a second "@"
(ours@reduce-overhead@regional: experiment=small_gpu's setting, regional compilation under whole-model CUDA
graphs; plain `ours` with --compile-mode reduce-overhead is compile=full:reduce-overhead).

Each variant runs in a fresh subprocess (its own memory peak and compile cache); with `ours` among them, a first
subprocess builds the tokenizer and token cache of --data (minutes on a fresh machine, outside any variant's
--timeout). Warm-up steps (compilation included) are excluded; the timed window ends with a device
synchronisation. MFU counts 6 x active parameters + the attention term (deepseek_mini.flops_per_token), the same
formula for every variant, against --peak-tflops (798: the measured bf16 matmul ceiling of our H100).

Variants
  ours                 the real thing: Lightning Trainer + TextDataModule on --data (Gutenberg),
                       bf16-mixed with fp32 master weights, torch.compile, the Triton AdamW step (--fused),
                       weight matrices in bf16 with their fp32 masters in the optimizer (--bf16-weights),
                       AdamW moments stored as --moments-dtype
  ours_raw             the same model and optimizer in a plain PyTorch loop on random tokens
  ours_raw_eager       ... without torch.compile
  ours_dense, ours_mha the dense-FFN and MHA baselines at matched active parameters (plain loop, compiled)
  hf_eager_fp32        transformers, experts loop, fp32 weights + bf16 autocast
  hf_grouped_fp32      transformers, grouped_mm experts, fp32 weights + bf16 autocast
  hf_grouped_bf16      transformers, grouped_mm experts, bf16 weights
  hf_grouped_bf16_compile   ... and torch.compile
  tt_deepseek_v3       torchtitan 0.3.0's own DeepSeek-V3 model (its build_mla_moe_layers + DeepSeekV3Model.Config)
                       at our shape: softmax routing, no balancing bias, grouped-mm experts, flex attention,
                       bf16 weights, each block compiled as torchtitan's apply_compile does + the compiled loss,
                       torch's fused AdamW (a benchmark peer only: `pip install torchtitan==0.3.0`, not a
                       dependency of the package; docs/benchmarks.md has its setup). 0.3.0 needs a torch newer
                       than 2.11; with torchtitan 0.2.x installed the same model is built through 0.2's
                       DeepSeekV3ModelArgs and compiled by 0.2's own apply_compile (tt_model_v02)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root; this file's folder (harness.py) is on sys.path already

OURS = ["ours", "ours_raw", "ours_raw_eager", "ours_dense", "ours_mha"]
DATA_CHILD = "prepare-data"  # the child that only builds the real-text data (prepare_data)
PEER = ["hf_eager_fp32", "hf_grouped_fp32", "hf_grouped_bf16", "hf_grouped_bf16_compile", "tt_deepseek_v3"]


def is_peer(variant: str) -> bool:
    return variant.startswith(("hf_", "tt_"))


def split_variant(name: str, default_mode: str, default_scope: str = "full") -> tuple[str, str, str]:
    """"ours@reduce-overhead@regional" -> ("ours", "reduce-overhead", "regional"); "ours" -> the defaults.
    A single suffix that is a scope ("ours@regional") sets the scope only."""
    base, *rest = name.split("@")
    mode = scope = None
    for part in rest:
        if part in ("full", "regional"):
            scope = part
        elif part:
            mode = part
    return base, mode or default_mode, scope or default_scope


def parse_fused(value: str):
    """--fused / --bf16-weights as LitDeepSeek's optim config takes them: "true"/"false" -> bool, else as is."""
    return {"true": True, "false": False}.get(value, value)


def small_config(variant: str):
    from deepseek_mini import ModelConfig

    name = {"ours_dense": "small_dense", "ours_mha": "small_mha"}.get(variant, "small")
    return ModelConfig.preset(name)


def hf_model(variant: str, cfg):
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from deepseek_mini.interop.hf import config_to_hf

    # the exact transformers equivalent of our config (deepseek_mini.interop.hf, checked logit-for-logit in tests/test_hf.py)
    hf_cfg = DeepseekV2Config.from_dict(config_to_hf(cfg), attn_implementation="sdpa")
    hf_cfg._experts_implementation = "eager" if variant == "hf_eager_fp32" else "grouped_mm"
    model = DeepseekV2ForCausalLM(hf_cfg)
    if "bf16" in variant:
        model = model.to(torch.bfloat16)
    return model


def tt_model(cfg, seq_len: int, device):
    """torchtitan's own DeepSeek-V3 built at our config's shape, field by field.

    Same parameter count as DeepSeekV2(cfg) (696,068,352 at `small`: both have the same norms and no biases).
    What the designs differ in: torchtitan has no auxiliary balance loss (ours adds `aux_loss_alpha`=0.001 per
    sequence) and its router GEMM runs in fp32 under an autocast region, its experts keep gate and up as two
    grouped GEMMs (ours: one), RMSNorm is torch's nn.RMSNorm (eps set to ours below), RoPE is its complex
    form, attention is flex attention over a causal block mask (ours: SDPA).
    """
    from functools import partial

    from torch import nn

    try:
        from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
        from torchtitan.models.deepseek_v3 import DeepSeekV3Model, build_mla_moe_layers
    except ImportError:  # torchtitan 0.2.x: the model built from its DeepSeekV3ModelArgs instead
        return tt_model_v02(cfg, seq_len, device)

    normal = partial(nn.init.normal_, std=cfg.initializer_range)  # our init (speed does not depend on it)
    linear_init = {"weight": normal, "bias": nn.init.zeros_}
    layers = build_mla_moe_layers(
        n_layers=cfg.num_hidden_layers, n_dense_layers=cfg.first_k_dense_replace, dim=cfg.hidden_size,
        n_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        mscale=1.0, dense_hidden_dim=cfg.intermediate_size, moe_hidden_dim=cfg.moe_intermediate_size,
        num_experts=cfg.n_routed_experts, num_shared_experts=cfg.n_shared_experts,
        router_top_k=cfg.num_experts_per_tok, router_score_func=cfg.scoring_func,
        router_route_scale=cfg.routed_scaling_factor, router_route_norm=cfg.norm_topk_prob,
        attn_backend="flex", moe_comm_backend="standard", non_blocking_capacity_factor=None,
        linear_init=linear_init, norm_init={"weight": nn.init.ones_}, depth_init=lambda layer_id: linear_init,
        depth_experts_init=lambda layer_id: dict.fromkeys(("w1_EFD", "w2_EDF", "w3_EFD"), normal),
        rope=ComplexRoPE.Config(dim=cfg.qk_rope_head_dim, max_seq_len=seq_len, theta=cfg.rope_theta))
    for layer in layers:  # `small` has no aux-loss-free bias (bias_update_speed=0): torchtitan's is off too
        if layer.moe is not None:
            layer.moe.load_balance_coeff = None
    V, D = cfg.vocab_size, cfg.hidden_size
    tt_cfg = DeepSeekV3Model.Config(
        vocab_size=V, dim=D, layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=V, embedding_dim=D, param_init={"weight": normal}),
        norm=RMSNorm.Config(normalized_shape=D, param_init={"weight": nn.init.ones_}),
        lm_head=Linear.Config(in_features=D, out_features=V, param_init=linear_init))
    return tt_materialise(tt_cfg.build, cfg, device)


def tt_materialise(build, cfg, device):
    """A torchtitan model as its trainer builds one: on the meta device, then materialised on `device` and
    initialised by its own init_weights; then our RMSNorm eps (ours: 1e-6 in the MLA latents too)."""
    import torch
    from torch import nn

    with torch.device("meta"):
        model = build()
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    for m in model.modules():
        if isinstance(m, nn.RMSNorm):
            m.eps = cfg.rms_norm_eps if m.normalized_shape[0] == cfg.hidden_size else 1e-6
    return model


def tt_model_v02(cfg, seq_len: int, device):
    """torchtitan 0.2.x's DeepSeek-V3 at our config's shape: the same model family as tt_model's 0.3.0 one, through
    0.2's DeepSeekV3ModelArgs + MoEArgs (0.3.0 imports torch.distributed.fsdp.DataParallelMeshDims, which torch
    2.11 lacks). Its own init (init_weights); flex attention with its causal mask; the two shared experts as one
    FFN of twice the width (torchtitan's layout, the same parameters); no yarn (original_seq_len = seq_len)."""
    from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
    from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
    from torchtitan.models.moe import MoEArgs

    moe = MoEArgs(num_experts=cfg.n_routed_experts, num_shared_experts=cfg.n_shared_experts,
                  score_func=cfg.scoring_func, route_norm=cfg.norm_topk_prob, route_scale=cfg.routed_scaling_factor,
                  top_k=cfg.num_experts_per_tok, use_grouped_mm=True, load_balance_coeff=None)
    args = DeepSeekV3ModelArgs(
        max_seq_len=seq_len, vocab_size=cfg.vocab_size, dim=cfg.hidden_size, inter_dim=cfg.intermediate_size,
        moe_inter_dim=cfg.moe_intermediate_size, n_layers=cfg.num_hidden_layers,
        n_dense_layers=cfg.first_k_dense_replace, n_heads=cfg.num_attention_heads, norm_eps=cfg.rms_norm_eps,
        moe_args=moe, q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        attn_type="flex", attn_mask_type="causal", original_seq_len=seq_len, rope_theta=cfg.rope_theta)
    args.moe_impl = "standard"  # set by update_from_config from a JobConfig in torchtitan's trainer
    model = tt_materialise(lambda: DeepSeekV3Model(args), cfg, device)
    model.tt_version = "0.2"
    return model


def tt_attention_masks(model, batch_size: int, seq_len: int, device):
    """torchtitan's causal block mask, built once (0.3.0 takes the positions, 0.2.x also a tokenizer it needs only
    for document masks)."""
    import torch

    positions = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
    if getattr(model, "tt_version", None) == "0.2":
        return model.get_attention_masks(positions, tokenizer=None)
    return model.get_attention_masks(positions)


def run_plain_loop(variant: str, args, mode: str, scope: str = "full") -> dict:
    """Plain PyTorch training loop on random tokens (ours_raw*, baselines and the transformers peer)."""
    import torch
    from harness import kernel_breakdown

    from deepseek_mini import DeepSeekV2, flops_per_token
    from deepseek_mini.optim.clip import clip_in_fused_step
    from deepseek_mini.optim.policy import build_adamw
    from deepseek_mini.optim.precision import bf16_weight_parameters, bf16_weights_on

    torch.manual_seed(0)
    cfg = small_config(variant)
    dev = torch.device("cuda")
    if args.sdpa != "auto":  # restrict SDPA to one kernel family, to compare them
        torch.backends.cuda.enable_cudnn_sdp(args.sdpa == "cudnn")
        torch.backends.cuda.enable_flash_sdp(args.sdpa == "flash")
        torch.backends.cuda.enable_mem_efficient_sdp(args.sdpa == "efficient")
    B, T = args.batch_size, args.seq_len
    tt_masks = None
    if variant.startswith("hf_"):
        model = hf_model(variant, cfg).to(dev)
    elif variant == "tt_deepseek_v3":
        model = tt_model(cfg, T, dev).train()
        with torch.no_grad():  # bf16 weights as the transformers peer's; not .to(bf16), which would turn
            for param in model.parameters():  # the complex RoPE cache buffers into real bf16 ones
                param.data = param.data.to(torch.bfloat16)
        # torchtitan's block mask (causal within each document; here one document per row), built once
        tt_masks = tt_attention_masks(model, B, T, dev)
    else:
        model = DeepSeekV2(cfg).to(dev)
    # ours: the AdamW LitDeepSeek builds for --fused; the peers: torch's fused kernel
    fused = True if is_peer(variant) else parse_fused(args.fused)
    opt = build_adamw(model.parameters(), fused, on_cuda=True, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                      moments="float32" if is_peer(variant) else args.moments_dtype)
    if not is_peer(variant) and bf16_weights_on(parse_fused(args.bf16_weights), opt, on_cuda=True,
                                                bf16_autocast=True, single_device=True):
        opt.keep_fp32_masters(bf16_weight_parameters(model))  # as LitDeepSeek does on one GPU
    compiled = variant in ("ours_raw", "ours_dense", "ours_mha", "hf_grouped_bf16_compile", "tt_deepseek_v3")
    if is_peer(variant):
        mode, scope = "default", "full"
    cudagraphs = compiled and mode in ("reduce-overhead", "max-autotune")
    fwd, tt_loss = model, None
    if variant == "tt_deepseek_v3":
        from torchtitan.components.loss import cross_entropy_loss

        if getattr(model, "tt_version", None) == "0.2":  # 0.2's own apply_compile: blocks, MoE parts, experts
            from torchtitan.config.job_config import Compile
            from torchtitan.models.llama4.infra.parallelize import apply_compile

            apply_compile(model, Compile(enable=True), ep_enabled=False)
        else:  # torchtitan's apply_compile: each TransformerBlock compiled in place (fullgraph)
            torch._dynamo.config.capture_scalar_outputs = True
            for block in model.layers.values():
                block.compile(fullgraph=True)
        tt_loss = torch.compile(cross_entropy_loss)  # and its loss
    elif compiled and scope == "regional":
        from deepseek_mini.training.compile import compile_regions

        fwd = compile_regions(model, mode=None if mode == "default" else mode)
    elif compiled:
        fwd = torch.compile(model, mode=None if mode == "default" else mode)
    autocast = not variant.endswith(("bf16", "bf16_compile")) and variant != "tt_deepseek_v3"
    data = torch.randint(0, cfg.vocab_size, (8, B, T + 1), device=dev)

    def step(i):
        batch = data[i % data.shape[0]]
        x, y = batch[:, :-1], batch[:, 1:]
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            if tt_loss is not None:  # summed over tokens, as torchtitan's loss; the mean here, as the others
                loss = tt_loss(fwd(x, attention_masks=tt_masks), y) / y.numel()
            elif variant.startswith("hf_"):
                loss = fwd(input_ids=x, labels=None).logits.float()
                loss = torch.nn.functional.cross_entropy(loss.view(-1, loss.shape[-1]), y.reshape(-1))
            else:
                out = fwd(x, labels=y, return_logits=False)
                loss = out.loss + out.aux_loss
        loss.backward()
        # ours: clipping folded into the fused AdamW step, as LitDeepSeek does; the peer clips the usual way
        if is_peer(variant) or clip_in_fused_step(opt, model.parameters(), 1.0) is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.grad_scale = None
        opt.zero_grad(set_to_none=True)
        return loss.detach().clone()  # a CUDA-graph output is overwritten by the next replay

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.warmup):
        loss = step(i)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tps = args.steps * B * T / elapsed
    res = {"tokens_per_sec": tps, "step_ms": 1000 * elapsed / args.steps, "compile_scope": scope,
           "params": sum(p.numel() for p in model.parameters()),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "warmup_s": warm_s,
           "flops_per_token": flops_per_token(cfg, T), "final_loss": float(loss)}
    if args.profile_steps:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for i in range(args.profile_steps):
                step(i)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        res["profile"] = kernel_breakdown(prof, args.profile_steps)
        res["profile"]["wall_ms_per_step_profiled"] = 1000 * wall / args.profile_steps
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60)
            (Path(args.profile) / f"profile_{variant}_{mode}.txt").write_text(table)
    return res


def run_lightning(variant: str, args, mode: str, scope: str = "full") -> dict:
    """The project's own training step: Lightning Trainer + TextDataModule on real text."""
    import torch
    from harness import lightning_throughput

    from deepseek_mini import flops_per_token
    from deepseek_mini.config import count_parameters

    cfg = small_config(variant)
    res = lightning_throughput(cfg, data_files=args.data, val_files=args.val_data, batch_size=args.batch_size,
                               seq_len=args.seq_len, warmup=args.warmup, steps=args.steps,
                               cache_dir=args.cache_dir, compile=f"{scope}:{mode}",
                               profile_steps=args.profile_steps,
                               sync_debug=args.sync_debug, fused=parse_fused(args.fused),
                               bf16_weights=parse_fused(args.bf16_weights), moments_dtype=args.moments_dtype)
    res.update(variant=variant, flops_per_token=flops_per_token(cfg, args.seq_len), compile_scope=scope,
               params=count_parameters(cfg).total,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    return res


def prepare_data(args) -> dict:
    """The tokenizer and token cache `ours` reads (harness.text_datamodule), built before any variant is timed:
    on a fresh machine that takes minutes, which would otherwise count against the first `ours` variant's --timeout."""
    from harness import text_datamodule

    start = time.perf_counter()
    text_datamodule(small_config("ours"), args.data, args.val_data, args.batch_size, args.seq_len,
                    args.cache_dir).prepare_data()
    return {"data_prep_s": time.perf_counter() - start}


def child(name: str, args) -> None:
    if name == DATA_CHILD:
        print("RESULT " + json.dumps(prepare_data(args)), flush=True)
        return
    variant, mode, scope = split_variant(name, args.compile_mode, args.compile_scope)
    run = run_lightning if variant == "ours" else run_plain_loop
    res = run(variant, args, mode, scope)
    res["variant"], res["compile_mode"] = name, mode
    print("RESULT " + json.dumps(res), flush=True)


def run_child(name: str, passed: list[str], timeout: float | None) -> tuple[dict | None, str, int]:
    """`bench_train.py --child <name>` in a fresh process: (its RESULT, or None when it printed none; the tail of its
    output; its return code, -9 when killed at `timeout`)."""
    cmd = [sys.executable, __file__, "--child", name, *passed]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        proc = subprocess.CompletedProcess(cmd, -9, stdout="", stderr=out.decode(errors="replace")
                                           if isinstance(out, bytes) else str(out))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    res = json.loads(line[len("RESULT "):]) if line is not None else None
    return res, (proc.stdout + proc.stderr)[-3000:], proc.returncode


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(OURS + PEER))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--peak-tflops", type=float, default=798.0)
    p.add_argument("--data", default=".data/gutenberg_classics_train.txt.gz")
    p.add_argument("--val-data", default=".data/gutenberg_classics_valid.txt")
    p.add_argument("--cache-dir", default=".cache/deepseek_mini")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("--sdpa", default="auto", choices=["auto", "cudnn", "flash", "efficient"])
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
                   help="torch.compile mode of our compiled variants (a variant's @mode overrides it)")
    p.add_argument("--compile-scope", default="full", choices=["full", "regional"],
                   help="ours: compile the whole model, or each transformer block once per kind (@regional)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after timing, profile this many steps and print GPU time per step by kernel category")
    p.add_argument("--profile", default=None, help="folder for the full torch.profiler table per variant")
    p.add_argument("--fused", default="auto", choices=["auto", "triton", "true", "false"],
                   help="our AdamW step (optim.fused): auto = Triton on CUDA; true = torch's fused kernel")
    p.add_argument("--bf16-weights", default="auto", choices=["auto", "true", "false"],
                   help="ours: weight matrices in bf16 with fp32 masters in the AdamW (optim.bf16_weights)")
    p.add_argument("--moments-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="ours: storage of the AdamW moments (optim.moments_dtype); auto = bfloat16 with the Triton step")
    p.add_argument("--sync-debug", action="store_true",
                   help="ours: record every host sync of one warm step (with the Python stack that caused it)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per variant subprocess")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"device: {device}; torch {torch.__version__}; batch {args.batch_size} x {args.seq_len}", flush=True)
    results = []
    passed = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in vars(args).items()
              if v is not None and v is not False and k not in ("variants", "child", "out")]
    variants = args.variants.split(",")
    if any(split_variant(v, args.compile_mode)[0] == "ours" for v in variants):
        # the data first, in a process of its own and without the variants' --timeout
        res, tail, rc = run_child(DATA_CHILD, passed, timeout=None)
        if res is None:
            print(f"[data] FAILED (rc {rc}):\n{tail}", flush=True)
            sys.exit(1)
        print(f"[data] tokenizer and tokens of {args.data} ready in {res['data_prep_s']:.0f}s", flush=True)
    for variant in variants:
        start = time.time()
        res, tail, rc = run_child(variant, passed, timeout=args.timeout)
        if res is None:
            print(f"[{variant}] FAILED (rc {rc}) after {time.time() - start:.0f}s:\n{tail}", flush=True)
            results.append({"variant": variant, "error": tail[-500:]})
            continue
        res["mfu"] = res["flops_per_token"] * res["tokens_per_sec"] / (args.peak_tflops * 1e12)
        results.append(res)
        print(f"[{variant}] {res['tokens_per_sec']:,.0f} tok/s  MFU {100 * res['mfu']:.1f}%  "
              f"peak {res['peak_gib']:.1f} GiB  loss {res.get('final_loss', float('nan')):.3f}  "
              f"params {res.get('params', 0):,}  "  # the plain loop times its warm-up; Lightning's run does not
              + (f"warm-up {res['warmup_s']:.0f}s  " if "warmup_s" in res else "")
              + f"({time.time() - start:.0f}s)", flush=True)
        if "profile" in res:
            prof = res["profile"]
            print(f"  profiled: {prof['wall_ms_per_step_profiled']:.1f} ms/step wall, "
                  f"{prof['gpu_ms_per_step']:.1f} ms/step of GPU kernels", flush=True)
            for cat, ms in prof["by_category_ms"].items():
                print(f"    {cat:<26} {ms:7.2f} ms", flush=True)
            for k in prof["top_kernels"][:12]:
                print(f"    {k['ms_per_step']:7.2f} ms x{k['calls_per_step']:.0f} [{k['category']}] {k['name'][:90]}",
                      flush=True)
            if "gpu_idle_ms_per_step" in prof:
                print(f"  GPU idle {prof['gpu_idle_ms_per_step']:.2f} ms/step of a {prof['gpu_span_ms_per_step']:.1f} ms "
                      f"span ({prof.get('kernels_per_step', 0):.0f} kernels per step; "
                      f"{prof.get('idle_in_short_gaps_ms_per_step', 0):.2f} ms in gaps under 10 us); longest gaps:",
                      flush=True)
                for g in prof["idle_gaps"][:8]:
                    print(f"    {g['gap_ms']:6.2f} ms after {g['after'][:40]} before {g['before'][:40]}; host: "
                          f"{', '.join(g['host'])[:150]}", flush=True)
        for site, n in res.get("host_syncs", {}).items():
            print(f"  host sync x{n}: {site}", flush=True)
    ok = [r for r in results if "error" not in r]
    peers = [r for r in ok if is_peer(r["variant"])]
    best_peer = max(peers, key=lambda r: r["tokens_per_sec"]) if peers else None
    print(f"\n| variant | tokens/s | MFU (of {args.peak_tflops:.0f} TFLOP/s) | peak GiB | vs best peer |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | failed | | | |")
            continue
        ratio = f"{r['tokens_per_sec'] / best_peer['tokens_per_sec']:.2f}x" if best_peer else "-"
        print(f"| {r['variant']} | {r['tokens_per_sec']:,.0f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {ratio} |")
    if best_peer:
        print(f"\nbest peer: {best_peer['variant']} ({best_peer['tokens_per_sec']:,.0f} tok/s, "
              f"{best_peer['peak_gib']:.1f} GiB)")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "torch": torch.__version__, "args": vars(args),
                                              "results": results}, indent=2))


if __name__ == "__main__":
    main()

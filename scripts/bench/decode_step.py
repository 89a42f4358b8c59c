"""One decode step for bench_decode.py, run two ways and timed: the model's own eager decode, and a static-shape
step (attend over the whole preallocated cache with a position mask, cache writes by index_copy_ at a device-side
position) that a CUDA graph captures once and replays; plus the checks that the two agree and that the fused
Triton decode kernel matches the PyTorch absorbed path.
"""

from __future__ import annotations

import math
import time

import torch

from deepseek_mini.model.attention import MLA, attend


# ---------------------------------------------------------------------- the benchmark's cache
@torch.no_grad()
def fill_cache(cache, ctx: int, seed: int = 0) -> None:
    """Random values in positions [0, ctx) of every layer (unit-scale, like RMS-normalised latents / roped keys)."""
    g = torch.Generator(device=_tensors(cache[0])[0].device).manual_seed(seed)
    for layer in cache:
        for t in _tensors(layer):
            view = t[:, :ctx] if t.dim() == 3 else t[:, :, :ctx]  # LatentCache [B,L,C]; KVCache [B,H,L,D]
            view.normal_(generator=g)


def _tensors(layer_cache) -> list[torch.Tensor]:
    return [v for v in vars(layer_cache).values() if isinstance(v, torch.Tensor)]


# ---------------------------------------------------------------------- one decode step, two ways
def eager_step(model, tok: torch.Tensor, cache, pos: int) -> torch.Tensor:
    logits = model(tok[:, None], cache=cache, start_pos=pos).logits[:, -1]
    return logits.argmax(-1)


def _static_attention(attn, x, pos_t, cache, mask):
    """The model's attention for one new token at device position pos_t [1], over the full preallocated cache."""
    B = x.shape[0]
    if isinstance(attn, MLA):
        absorb = attn.decode_mode == "absorb"
        if absorb and attn.decode_kernel(1, cache.kv):  # the model's own kernel path, which writes the cache
            return attn.o_proj(attn.decode_step(x, pos_t, cache.kv).reshape(B, 1, attn.n_heads * attn.v_dim))
        q, q_pe, c_kv, k_pe = attn.project(x, pos_t, absorbed=absorb)  # q: latent when absorbed
        cache.kv.index_copy_(1, pos_t, torch.cat([c_kv, k_pe.squeeze(2)], dim=-1).to(cache.kv.dtype))
        if absorb:
            o = attn._absorbed(q, q_pe, cache.kv, None, kv_len=pos_t + 1)
        else:
            c_past, kpe_past = cache.kv.to(x.dtype).split([attn.rank, attn.rope_dim], dim=-1)
            o = attn._naive(q, q_pe, c_past, kpe_past.unsqueeze(2), mask=mask)
        return attn.o_proj(o.reshape(B, 1, attn.n_heads * attn.v_dim))
    q, k, v = attn.project(x, pos_t)
    cache.k.index_copy_(2, pos_t, k.to(cache.k.dtype))
    cache.v.index_copy_(2, pos_t, v.to(cache.v.dtype))
    o = attend(q, cache.k.to(q.dtype), cache.v.to(q.dtype), attn.scale, is_causal=False, mask=mask)
    return attn.o_proj(o.transpose(1, 2).reshape(B, 1, attn.n_heads * attn.hd))


def static_logits(model, tok: torch.Tensor, pos_t: torch.Tensor, cache, key_pos: torch.Tensor) -> torch.Tensor:
    """Static-shape decode step (no host sync, no shape change between steps): CUDA-graph capturable."""
    mask = (key_pos <= pos_t)[None, :]  # [1, L]: keys up to and including the new token
    x = model.model.embed_tokens(tok[:, None])
    for layer, layer_cache in zip(model.model.layers, cache):
        x = x + _static_attention(layer.self_attn, layer.input_layernorm(x), pos_t, layer_cache, mask)
        h = layer.mlp(layer.post_attention_layernorm(x))
        x = x + (h[0] if layer.is_moe else h)
    return model.lm_head(model.model.norm(x))[:, -1]


def static_step(model, tok, pos_t, cache, key_pos) -> torch.Tensor:
    return static_logits(model, tok, pos_t, cache, key_pos).argmax(-1)


_COMPILED: dict = {}


def compiled_step(options: dict | None = None):
    """static_step through torch.compile, one compiled function per set of Inductor options (bench_decode.py's
    --inductor, e.g. max_autotune=True: Triton GEMM templates tuned per shape; coordinate_descent_tuning=True)."""
    key = repr(sorted((options or {}).items()))  # a value may be a list (unhashable)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(static_step, dynamic=False, options=dict(options or {}) or None)
    return _COMPILED[key]


# every (variant, batch, cache length) point is its own static graph: allow them all, instead of dynamo silently
# falling back to the uncompiled step after its default limit of 8
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)


# ---------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


@torch.no_grad()
def time_eager(model, cache, batch, ctx, steps, warmup, device) -> float:
    tok = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    pos = ctx
    for _ in range(warmup):
        tok = eager_step(model, tok, cache, pos)
        pos += 1
    with Timer(device) as t:
        for _ in range(steps):
            tok = eager_step(model, tok, cache, pos)
            pos += 1
    return t.ms / steps


@torch.no_grad()
def time_graph(model, cache, batch, ctx, steps, warmup, device, max_len, step_fn=None) -> float:
    """Capture static_step once in a CUDA graph (after warm-up on a side stream) and time replays."""
    step_fn = step_fn or static_step
    tok = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    pos_t = torch.full((1,), ctx, dtype=torch.long, device=device)
    key_pos = torch.arange(max_len, device=device)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(max(2, warmup)):
            tok.copy_(step_fn(model, tok, pos_t, cache, key_pos))
            pos_t.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step_fn(model, tok, pos_t, cache, key_pos)
        tok.copy_(out)
        pos_t.add_(1)
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    if int(pos_t) + steps > max_len:
        raise RuntimeError("cache too short for the timed graph steps")
    with Timer(device) as t:
        for _ in range(steps):
            graph.replay()
    if PROFILE.get("steps"):  # where a replay's GPU time goes, by kernel category
        from harness import kernel_breakdown
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(PROFILE["steps"]):
                graph.replay()
            torch.cuda.synchronize()
        PROFILE["last"] = kernel_breakdown(prof, PROFILE["steps"])
    del graph
    return t.ms / steps


PROFILE: dict = {}  # --profile N: profile N replays of every graph point (bench_point attaches the summary)


# ---------------------------------------------------------------------- checks
@torch.no_grad()
def check_static_matches_eager(model, device, batch: int = 2, ctx: int = 8) -> float:
    """Max |logits| difference between the static step and the model's eager decode step at the same position."""
    max_len = ctx + 4
    caches = [model.new_cache(batch, max_len, device=device) for _ in range(2)]
    for c in caches:
        fill_cache(c, ctx, seed=1)
    tok = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    eager = model(tok[:, None], cache=caches[0], start_pos=ctx).logits[:, -1].float()
    static = static_logits(model, tok, torch.tensor([ctx], device=device), caches[1],
                           torch.arange(max_len, device=device)).float()
    return float((eager - static).abs().max()) if math.isfinite(float(eager.abs().max())) else math.inf


@torch.no_grad()
def check_folded_matches_unfolded(model, device, batch: int = 4, ctx: int = 64) -> float:
    """Relative max difference of one eager decode step's logits with the weights folded (DeepSeekV2.folded_weights)
    and without: the same model up to roundings (bf16: the folded products are rounded once, not twice)."""
    cache = model.new_cache(batch, ctx + 1, device=device)
    fill_cache(cache, ctx, seed=2)
    tok = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    plain = model(tok[:, None], cache=cache, start_pos=ctx).logits.float()
    with model.folded_weights():
        folded = model(tok[:, None], cache=cache, start_pos=ctx).logits.float()
    return float((folded - plain).abs().max() / plain.abs().max())


@torch.no_grad()
def check_fused_kernel(model, device, batch: int = 3, ctx: int = 1000) -> float:
    """Relative max difference of one layer's decode step through the Triton kernels (MLA.decode_step: the cache
    write, the attention, W_UV) against the PyTorch path (fused_decode off), rows at different positions; the cache
    slots the two wrote must match too (returns inf where they do not, to bf16 rounding)."""
    attn = model.model.layers[0].self_attn
    g = torch.Generator(device=device).manual_seed(0)
    dtype = attn.kv_b_proj.weight.dtype
    x = torch.randn(batch, 1, attn.cfg.hidden_size, device=device, generator=g).to(dtype)
    pos = ctx - 1 - 37 * torch.arange(batch, device=device)
    caches = [attn.new_cache(batch, ctx, device, dtype) for _ in range(2)]
    for cache in caches:  # the same values in both
        fill_cache([cache], ctx, seed=3)
    outs = []
    for fused, cache in zip((True, False), caches):
        attn.fused_decode = fused
        outs.append(attn(x, pos[:, None], cache, start_pos=pos).float())
    attn.fused_decode = True
    written = [c.kv[torch.arange(batch, device=device), pos].float() for c in caches]
    if float((written[0] - written[1]).abs().max()) > 2e-2 * float(written[1].abs().max()):
        return math.inf
    return float((outs[0] - outs[1]).abs().max() / outs[1].abs().max())

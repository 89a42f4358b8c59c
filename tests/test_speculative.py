"""Self-speculative decoding (model/speculative.py): greedy output equals plain greedy decoding token for token
whatever the drafts are (random MTP, drafts forced right, drafts forced wrong), also when the rows of a batch
(ragged prompts) accept different lengths and advance by their own (each row equals that row decoded alone, and
the per-row verification counts show no row waits for another), the MTP caches' per-row rollback drafts what a
cache-free recomputation drafts, and sampling keeps the main model's distribution (measured on a tiny
vocabulary, with wrong acceptance / resampling rules as negative controls)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from conftest import load_script
from model_helpers import SMALL_MODEL, rope_rows

from deepseek_mini.config import ModelConfig
from deepseek_mini.model import speculative as spec
from deepseek_mini.model.sampling import sampling_probs
from deepseek_mini.model.speculative import SpeculativeStats
from deepseek_mini.model.transformer import DeepSeekV2

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepSeekV2(ModelConfig.from_dict({**SMALL_MODEL, "num_nextn_predict_layers": 3})).double().eval()


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(0, SMALL_MODEL["vocab_size"], (3, 7), generator=torch.Generator().manual_seed(5))


def forced_drafter(model, plain_rows: list[torch.Tensor], modes: list[str], seed: int = 0):
    """A drafter that proposes, per row, the row's own plain greedy continuation (`right`), that plus one (`wrong`),
    random tokens (`random`) or the MTP modules' drafts (`mtp`, the real drafter, which runs for every row so its
    caches stay as they would be). plain_rows[b]: row b's prompt and plain greedy continuation, unpadded."""
    V = model.config.vocab_size
    real = spec._Drafter.draft
    g = torch.Generator().manual_seed(seed)

    def draft(self, tokens, N, n, sampler, live):
        mtp, _ = real(self, tokens, N, n, sampler, live)
        drafts = []
        for b, mode in enumerate(modes):
            ref = plain_rows[b][int(N[b]) + 1:int(N[b]) + n + 1]
            ref = torch.cat([ref, ref.new_zeros(n - len(ref))])  # past the plain run's end: anything
            drafts.append({"right": ref, "wrong": (ref + 1) % V, "mtp": mtp[b],
                           "random": torch.randint(0, V, (n,), generator=g)}[mode])
        drafts = torch.stack(drafts)
        tokens[torch.arange(len(modes))[:, None], N[:, None] + 1 + torch.arange(n)] = drafts
        return drafts, None
    return draft


@pytest.mark.parametrize("drafts", ["mtp", "right", "wrong"])
def test_greedy_equals_plain_greedy(model, prompts, drafts, monkeypatch):
    plain = model.generate(prompts, 20, temperature=0)
    if drafts != "mtp":
        monkeypatch.setattr(spec._Drafter, "draft", forced_drafter(model, list(plain), [drafts] * 3))
    stats = SpeculativeStats()
    out = model.generate(prompts, 20, temperature=0, speculative=True, stats=stats)
    assert torch.equal(out, plain)
    rates = stats.acceptance()
    if drafts == "right":
        assert rates == [1.0, 1.0, 1.0] and stats.tokens_per_round() == pytest.approx(19 / 5)  # 4 + 4 + 4 + 4 + 3
    elif drafts == "wrong":
        assert rates[0] == 0.0 and stats.tokens_per_round() == 1.0


RAGGED = [7, 4, 9, 5]  # prompt lengths of the batch below (right-padded to 9)


@pytest.fixture(scope="module")
def ragged(model):
    """Four prompts of different lengths, right-padded, and each row's plain greedy run alone (batch 1)."""
    ids = torch.randint(0, SMALL_MODEL["vocab_size"], (len(RAGGED), max(RAGGED)),
                        generator=torch.Generator().manual_seed(7))
    plain_rows = [model.generate(ids[b:b + 1, :L], 20, temperature=0)[0] for b, L in enumerate(RAGGED)]
    return ids, torch.tensor(RAGGED), plain_rows


def test_rows_accept_different_lengths_and_each_equals_its_own_greedy(model, ragged, monkeypatch):
    """Rows with forced-right, forced-wrong, random and MTP drafts accept different lengths each round and
    advance by their own: every row's output is plain greedy decoding of that row alone, token for token, and
    the always-right row needs 5 verifications for its 19 tokens while the always-wrong one needs 19 (under the
    old shortest-prefix rule every row took 19 rounds of 1 token)."""
    ids, lengths, plain_rows = ragged
    modes = ["right", "wrong", "random", "mtp"]
    monkeypatch.setattr(spec._Drafter, "draft", forced_drafter(model, plain_rows, modes))
    stats = SpeculativeStats()
    out = model.generate(ids, 20, temperature=0, speculative=True, stats=stats, prompt_lengths=lengths)
    for b, L in enumerate(RAGGED):
        assert torch.equal(out[b, max(RAGGED):], plain_rows[b][L:]), modes[b]
    assert stats.row_rounds[:2] == [5, 19] and stats.row_tokens == [19] * 4
    assert stats.tokens_per_round_per_row()[:2] == [19 / 5, 1.0]
    assert stats.row_accepted[:2] == [14, 0] and stats.rounds == 19
    assert stats.as_dict()["tokens_per_round_per_row"] == stats.tokens_per_round_per_row()


def test_right_row_finishes_in_fewer_rounds_than_the_shortest_prefix_would_take(model, ragged, monkeypatch):
    """Two rows, one always right, one always wrong, and an EOS the right row emits early: the right row is
    done after ceil(first EOS / 4) verifications, where the shortest-prefix rule (one token per round for both
    rows) needed one per token."""
    ids, lengths, plain_rows = ragged
    order = [1, 0]  # ragged row 1 (the right one: its text does not loop early) and row 0
    ids, lengths, plain_rows = ids[order], lengths[order], [plain_rows[b] for b in order]
    new0 = plain_rows[0][int(lengths[0]):].tolist()
    first_eos = next(i for i in range(6, 20) if new0[i] not in new0[:i])  # the right row's EOS, new token #i
    eos = new0[first_eos]
    expected = [model.generate(ids[b:b + 1, :int(lengths[b])], 20, temperature=0, eos_token_id=eos)[0, int(lengths[b]):]
                for b in range(2)]
    monkeypatch.setattr(spec._Drafter, "draft", forced_drafter(model, plain_rows, ["right", "wrong"]))
    stats = SpeculativeStats()
    out = model.generate(ids, 20, temperature=0, eos_token_id=eos, speculative=True, stats=stats,
                         prompt_lengths=lengths)
    for b in range(2):
        row = out[b, ids.shape[1]:]
        assert torch.equal(row[:len(expected[b])], expected[b]) and (row[len(expected[b]):] == eos).all()
    assert len(expected[0]) == first_eos + 1 and len(expected[1]) == 20  # the wrong row runs to the end
    assert stats.row_rounds[0] == -(-first_eos // 4) < first_eos  # 4 tokens per verification, not 1


def test_ragged_plain_generate_equals_each_row_alone(model, ragged):
    """Plain generate's per-row decode path (ragged prompts) equals each row decoded alone, through the
    absorbed and the naive MLA decode."""
    ids, lengths, plain_rows = ragged
    for mode in ("absorb", "naive"):
        model.set_mla_decode(mode)
        try:
            out = model.generate(ids, 12, temperature=0, prompt_lengths=lengths)
        finally:
            model.set_mla_decode("absorb")
        for b, L in enumerate(RAGGED):
            assert torch.equal(out[b, max(RAGGED):], plain_rows[b][L:L + 12]), (mode, b)


def test_one_token_per_row_goes_to_the_fused_kernel_with_per_row_lengths(model, ragged, monkeypatch):
    """On CUDA a one-token step runs the fused decode kernel, which takes no mask: the per-row path must hand it
    each row's own length (kv_len = start_pos + 1). Here the kernel is stood in for by the same attention in
    torch (honouring kv_len, as the kernel does), and so is the cache write before it, so a wrong bound fails on the
    CPU too."""
    from deepseek_mini.kernels import mla_decode

    calls = []

    def kernel(q_lat, q_pe, kv, kv_len, scale, w_uv, cos, sin):  # [B, H, C], [B, H, R], [B, L, C + R], [B], [H, V, C]
        calls.append(kv_len.clone())
        if cos is not None:  # q_pe comes unrotated: rotate pairs at each row's new position, kv_len - 1
            q_pe = rope_rows(q_pe, cos, sin, kv_len - 1)
        scores = torch.einsum("bhc,blc->bhl", torch.cat([q_lat, q_pe], -1), kv) * scale
        scores = scores.masked_fill(torch.arange(kv.shape[1])[None, None, :] >= kv_len[:, None, None], float("-inf"))
        o_lat = torch.einsum("bhl,blc->bhc", scores.softmax(-1), kv[..., :q_lat.shape[-1]])
        return torch.einsum("bhc,hvc->bhv", o_lat, w_uv)

    def append(kv_new, kv_norm, cache, pos, cos, sin, q_new=None, q_norm=None):  # the cache write before it
        C = kv_norm.weight.shape[0]
        k_pe = rope_rows(kv_new[:, None, C:], cos, sin, pos)[:, 0]
        cache[torch.arange(kv_new.shape[0]), pos] = torch.cat([kv_norm(kv_new[:, :C]), k_pe], -1).to(cache.dtype)
        return (None if q_new is None else q_norm(q_new)), (pos + 1).int()

    monkeypatch.setattr(mla_decode, "available", lambda t: True)
    monkeypatch.setattr(mla_decode, "mla_decode_attention", kernel)
    monkeypatch.setattr(mla_decode, "append_latent", append)
    ids, lengths, plain_rows = ragged
    out = model.generate(ids, 8, temperature=0, prompt_lengths=lengths)
    assert calls and torch.equal(calls[0], (lengths + 1).int())  # the first step: row b at position length_b
    for b, L in enumerate(RAGGED):
        assert torch.equal(out[b, max(RAGGED):], plain_rows[b][L:L + 8]), b


@pytest.mark.parametrize("attention", ["mha", "gqa"])
def test_per_row_path_of_the_baselines(attention):
    """MHA / GQA caches (KVCache) take per-row positions too: ragged speculative decoding equals each row alone."""
    torch.manual_seed(0)
    cfg = {**SMALL_MODEL, "attention": attention, "num_key_value_heads": 4 if attention == "mha" else 2,
           "num_nextn_predict_layers": 2}
    m = DeepSeekV2(ModelConfig.from_dict(cfg)).double().eval()
    ids = torch.randint(0, SMALL_MODEL["vocab_size"], (3, 8), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([8, 3, 5])
    out = m.generate(ids, 10, temperature=0, speculative=True, prompt_lengths=lengths)
    for b, L in enumerate(lengths.tolist()):
        assert torch.equal(out[b, 8:], m.generate(ids[b:b + 1, :L], 10, temperature=0)[0, L:]), b


@pytest.mark.parametrize("lengths", [[3, 0, 2], [3, 9, 2], [3, 2]])
def test_bad_prompt_lengths_are_refused(model, lengths):
    with pytest.raises(ValueError, match=r"prompt_lengths must hold 3 lengths in 1\.\.7"):
        model.generate(torch.zeros(3, 7, dtype=torch.long), 4, temperature=0, speculative=True,
                       prompt_lengths=torch.tensor(lengths))


def test_greedy_with_eos_matches_plain(model, prompts):
    plain = model.generate(prompts, 16, temperature=0)
    eos = int(plain[1, 7 + 5])  # a token row 1 emits: rows stop (and pad with eos) at different steps
    expected = model.generate(prompts, 16, temperature=0, eos_token_id=eos)
    out = model.generate(prompts, 16, temperature=0, eos_token_id=eos, speculative=True)
    assert torch.equal(out[:, :expected.shape[1]], expected)
    assert (out[:, expected.shape[1]:] == eos).all()


def test_mtp_drafts_equal_a_cache_free_recomputation(model, ragged, monkeypatch):
    """The drafter keeps per-depth caches and hidden states across rounds, per row, and rolls them back past
    rejected drafts; each round's drafts of every live row must equal the MTP chain recomputed from scratch on
    that row's committed tokens alone (ragged prompts: the rows sit at different positions throughout)."""
    ids, lengths, _ = ragged
    seen = []
    real = spec._Drafter.draft

    def recording(self, tokens, N, n, sampler, live):
        committed = [tokens[b, :int(N[b]) + 1].clone() for b in range(len(N))]
        drafts, q = real(self, tokens, N, n, sampler, live)
        seen.append((committed, n, drafts.clone(), live.clone()))
        return drafts, q

    monkeypatch.setattr(spec._Drafter, "draft", recording)
    model.generate(ids, 24, temperature=0, speculative=True, prompt_lengths=lengths)
    assert len(seen) >= 6 and len({len(c) for c in seen[2][0]}) > 1
    for committed, n, drafts, live in seen:
        for b in live.nonzero().flatten().tolist():
            ext = committed[b][None]
            N = ext.shape[1] - 1
            h, _, _ = model.hidden_states(ext[:, :N])
            for k in range(1, n + 1):
                h, _, _ = model.mtp[k - 1](h, model.model.embed_tokens(ext[:, k:N + k]), torch.arange(N))
                d = model.lm_head(model.mtp[k - 1].shared_head.norm(h[:, -1])).argmax(-1)
                assert torch.equal(d, drafts[b:b + 1, k - 1]), (b, N, k)
                ext = torch.cat([ext, d[:, None]], 1)


# ---------------------------------------------------------------------- sampling keeps the distribution
V = 4
STAT_MODEL = dict(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=8,
                  qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, intermediate_size=16, n_routed_experts=None,
                  first_k_dense_replace=0, max_position_embeddings=16, num_nextn_predict_layers=2)
SAMPLING = dict(temperature=0.9, top_k=None, top_p=0.95)
DRAWS = 8000


@pytest.fixture(scope="module")
def stat_model():
    """Tiny vocabulary; a sharpened head so the main model's and the drafts' distributions differ a lot."""
    torch.manual_seed(0)
    m = DeepSeekV2(ModelConfig.from_dict(STAT_MODEL)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    prompt = torch.tensor([[1, 2, 3]])
    pairs = torch.tensor(list(itertools.product(range(V), repeat=2)))
    with torch.no_grad():
        p = sampling_probs(m(torch.cat([prompt.expand(len(pairs), -1), pairs], 1)).logits[:, 2:5], **SAMPLING)
    exact = torch.zeros(V, V, V, dtype=torch.float64)  # P(x1, x2, x3), from full forwards without any cache
    for i, (a, b) in enumerate(pairs.tolist()):
        exact[a, b] = p[i, 0, a].double() * p[i, 1, b].double() * p[i, 2].double()
    return m, prompt, exact


def oracle_then_flat(m, generator):
    """Depth 1 drafts from the main model's own distribution (always accepted, so every row reaches depth 2);
    depth 2 from a flattened one (p^0.3). Rows sit at their own N_b: the forwards go by groups of equal N_b."""
    def draft(self, tokens, N, n, sampler, live):
        drafts, qs = [], []
        rows = torch.arange(len(N))
        for k in range(1, n + 1):
            p = torch.empty(len(N), V)
            for pos in N.unique().tolist():
                at = N == pos
                p[at] = sampling_probs(m(tokens[at, :pos + k]).logits[:, -1], **SAMPLING)
            q = p if k == 1 else p.pow(0.3) / p.pow(0.3).sum(-1, keepdim=True)
            d = torch.multinomial(q, 1, generator=generator).squeeze(1)
            tokens[rows, N + k] = d
            drafts.append(d)
            qs.append(q)
        return torch.stack(drafts, 1), torch.stack(qs, 1)
    return draft


def sampled_tv(stat_model, drafter: str, monkeypatch, seed: int = 0) -> tuple[float, list[float]]:
    """Total variation between the empirical joint of the first three sampled tokens and the exact one, and
    the acceptance per depth."""
    m, prompt, exact = stat_model
    g = torch.Generator().manual_seed(seed)
    if drafter == "oracle":
        monkeypatch.setattr(spec._Drafter, "draft", oracle_then_flat(m, g))
    stats = SpeculativeStats()
    out = m.generate(prompt.expand(DRAWS, -1), 4, **SAMPLING, generator=g, speculative=True, stats=stats)[:, 3:6]
    idx = out[:, 0] * V * V + out[:, 1] * V + out[:, 2]
    counts = torch.zeros(V ** 3, dtype=torch.float64).index_add_(0, idx, torch.ones(DRAWS, dtype=torch.float64))
    return 0.5 * (counts.view(V, V, V) / DRAWS - exact).abs().sum().item(), stats.acceptance()


# at 8,000 draws (seed 0), rows advancing by their own accepted prefix: the right rule gives 0.017 (MTP drafts)
# and 0.017 (oracle drafts); the wrong rules below 0.17 (resample from p), 0.13 (70% of the ratio) and 0.53
# (accept always). (The earlier shortest-prefix rounds: 0.018, 0.017; 0.10, 0.098, 0.53; seeds 1-2 at 20,000 draws 0.008-0.01.)
TV_LIMIT = 0.035


@pytest.mark.parametrize("drafter", ["mtp", "oracle"])
def test_sampling_keeps_the_main_models_distribution(stat_model, drafter, monkeypatch):
    tv, rates = sampled_tv(stat_model, drafter, monkeypatch)
    assert tv < TV_LIMIT
    tested = rates[1] if drafter == "oracle" else rates[0]
    assert 0.2 < tested < 0.9  # acceptance and rejection both happen often at the depth under test


@pytest.mark.parametrize("drafter, wrong", [
    ("mtp", "accept_always"),  # verification that does not check
    ("mtp", "resample_from_p"),  # a rejection redraws from p instead of norm(max(0, p - q))
    ("oracle", "accept_70_percent_of_ratio"),  # a subtly wrong acceptance probability, at depth 2
])
def test_wrong_rules_are_detected(stat_model, drafter, wrong, monkeypatch):
    """The negative controls: the same measurement fails for a wrong rule (the test above can fail)."""
    if wrong == "accept_always":
        monkeypatch.setattr(spec, "accept", lambda p_d, q_d, u: torch.ones_like(p_d, dtype=torch.bool))
    elif wrong == "resample_from_p":
        monkeypatch.setattr(spec, "residual", lambda p, q: p)
    else:
        monkeypatch.setattr(spec, "accept", lambda p_d, q_d, u: u * q_d < 0.7 * p_d)
    assert sampled_tv(stat_model, drafter, monkeypatch)[0] > TV_LIMIT


def test_without_mtp_modules_speculative_is_refused():
    torch.manual_seed(0)
    plain = DeepSeekV2(ModelConfig.from_dict(SMALL_MODEL))
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        plain.generate(torch.zeros(1, 3, dtype=torch.long), 4, speculative=True)


# ---------------------------------------------------------------------- scripts/generate.py speculative=true
@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    """A tiny MLA + MoE checkpoint with two MTP modules, and a byte-level BPE tokenizer.json beside it."""
    from model_helpers import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("mtp_run") / "checkpoints",
                                 ["The quick brown fox jumps over the lazy dog.", "Once upon a time."],
                                 num_nextn_predict_layers=2)


@pytest.mark.slow
def test_generate_cli_speculative_greedy_matches_plain(mtp_ckpt, tmp_path):
    from conftest import run_cli

    path, model, tok = mtp_ckpt
    prompt = "Once upon a time"
    proc = run_cli("scripts/generate.py", f"ckpt_path={path}", f"prompt={prompt}", "max_new_tokens=12",
                   "temperature=0", "speculative=true", "stop_at_eos=false", cwd=tmp_path)
    ids = tok.encode(prompt).ids
    out = model.generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
    assert proc.stdout == prompt + tok.decode(out, skip_special_tokens=False) + "\n"
    assert "speculative: 2 MTP draft(s), acceptance per depth" in proc.stderr.strip().splitlines()[-1]


def test_generate_speculative_needs_mtp_modules(tmp_path, monkeypatch):
    """A checkpoint without MTP modules is refused right after reading its config, before any token (generate.py
    prints ConfigError as its one line `error: ...` with exit status 2, as tests/test_inference.py checks)."""
    from omegaconf import OmegaConf

    from deepseek_mini.config import ConfigError

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=320, max_position_embeddings=64, hidden_size=64, num_hidden_layers=2)
    torch.save({"state_dict": {"model." + k: v for k, v in DeepSeekV2(cfg).state_dict().items()},
                "hyper_parameters": {"model_config": cfg.to_dict()}}, tmp_path / "plain.ckpt")
    script = load_script("scripts/generate.py", monkeypatch)
    run_cfg = OmegaConf.load(ROOT / "configs" / "generate.yaml")
    run_cfg.merge_with({"ckpt_path": str(tmp_path / "plain.ckpt"), "speculative": True})
    with pytest.raises(ConfigError) as e:
        script.run(run_cfg)
    assert str(e.value) == ("speculative=true: the checkpoint has no MTP modules to draft with "
                            "(model.num_nextn_predict_layers=0; train with model.num_nextn_predict_layers=1 or more)")


@pytest.mark.parametrize("value", ["maybe", 1, "yes"])
def test_speculative_flag_must_be_a_boolean(value):
    from deepseek_mini.config import ConfigError
    from deepseek_mini.generation_args import check_sampling

    with pytest.raises(ConfigError, match=f"^speculative={value}: use true or false$"):
        check_sampling({"speculative": value, "temperature": 0.8, "max_new_tokens": 4})


def test_bench_decode_speculative_on_a_checkpoint_cpu(mtp_ckpt, tmp_path, monkeypatch):
    """scripts/bench/bench_decode.py --ckpt (what the lead runs on the GPU) on CPU with the tiny MTP checkpoint."""
    import json
    import sys

    monkeypatch.setattr(sys, "argv", ["bench_decode.py"])
    bench = load_script("scripts/bench/bench_decode.py", monkeypatch)
    assert bench.main(["--inductor", "no_such_option=1"]) == 2  # refused before any work
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    rc = bench.main(["--device", "cpu", "--ckpt", str(mtp_ckpt[0]), "--prompt-file", str(tmp_path / "text.txt"),
                     "--prompt-tokens", "8", "--gen-tokens", "5", "--batches", "2", "--out", str(tmp_path / "s.json")])
    assert rc == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["checkpoint"]["num_nextn_predict_layers"] == 2 and data["checkpoint"]["params_mtp"] > 0
    assert [(r["batch"], r["mode"], r["status"]) for r in data["rows"]] == [(2, "plain", "ok"), (2, "speculative", "ok")]
    r = data["rows"][1]
    assert r["same_tokens_as_plain"] == 1.0 and len(r["acceptance_per_depth"]) == 2 and r["tokens_per_s"] > 0


def test_mtp_experiment_pairs_each_seed_with_its_own_baseline(tmp_path, monkeypatch):
    """scripts/bench/mtp_experiment.py's table: val loss MTP - baseline per seed at the validation steps both
    logged (a run stopped early contributes only its own steps), and the mean over seeds."""
    import json

    exp = load_script("scripts/bench/mtp_experiment.py", monkeypatch)
    curves = {"mtp_s1": {0: 9.0, 10: 5.0, 20: 4.0}, "base_s1": {0: 9.0, 10: 5.1, 20: 4.3},
              "mtp_s2": {0: 8.0, 10: 6.0}, "base_s2": {0: 8.0, 10: 5.8, 20: 4.0}}  # mtp_s2 stopped early
    for name, curve in curves.items():
        rows = ["step,train/loss,val/loss" + (",train/mtp_loss_1" if name.startswith("mtp") else "")]
        for step, v in curve.items():
            rows.append(f"{step},7.0,{v}" + (",7.5" if name.startswith("mtp") else ""))
        (tmp_path / f"metrics_{name}.csv").write_text("\n".join(rows) + "\n")
        (tmp_path / f"results_{name}.json").write_text(json.dumps({"status": "completed", "global_step": 20}))
    result = exp.summarize(tmp_path, [1, 2])
    assert result["mtp_minus_base"][1] == pytest.approx({0: 0.0, 10: -0.1, 20: -0.3})
    assert result["mtp_minus_base"][2] == pytest.approx({0: 0.0, 10: 0.2})
    assert result["mean_mtp_minus_base"] == pytest.approx({0: 0.0, 10: 0.05})  # only steps every seed has
    assert result["runs"]["mtp_s1"]["mtp_loss_1_last"] == 7.5 and result["runs"]["base_s1"]["mtp_loss_1_last"] is None
    assert "| MTP - base, mean | | | | +0.0000 | +0.0500 |" in (tmp_path / "mtp_experiment.md").read_text()

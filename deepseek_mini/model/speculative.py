"""Self-speculative decoding: the model's own MTP modules (mtp.py) draft, the main model verifies.

One round, with x_0..x_N committed (the main model has cached positions < N; x_N is not fed yet):

1. draft: MTP depth k at position N-1 reads depth k-1's hidden state there and the embedding of token
   x_{N+k-1} (for k >= 2 the previous depth's draft) and proposes d_k for x_{N+k}, k = 1..D;
2. verify: ONE main-model forward over [x_N, d_1, .., d_D] at positions N..N+D (a multi-token decode step over
   the latent cache) gives the main model's distribution p_j for every drafted position and one beyond;
3. accept: greedy keeps d_j while it equals argmax p_j; sampling keeps d_j with probability min(1, p_j/q_j)
   (q_j: the draft's distribution) and at the first rejection draws from norm(max(0, p_j - q_j)) (Leviathan et
   al. 2023, Chen et al. 2023): each committed token is distributed exactly as the main model's own sample. After
   the accepted prefix comes one token of the main model's own (the correction, or p_{D+1} if all were kept).

Rollback is free: every cache is written at `start_pos` and read only up to the current position, so the
entries of rejected drafts lie beyond the next round's start and are overwritten before anything reads them.
Each MTP depth keeps its own latent cache and hidden-state buffer with a frontier `valid[k]` per row: positions
below it were computed from committed tokens only; a round recomputes depth k from there to N-1 (its last k-1
positions read drafts, so they are redone next round).

Batch > 1: every row advances by its own accepted prefix. Row b has its own N_b (a [B] tensor); the verifying
forward and the drafter's forwards take per-row start positions, so each row's cache writes, RoPE positions and
causal mask are its own (attention.py's per-row path; plain decoding keeps the scalar one). A round drafts and
verifies n = D tokens for every live row (fewer only near max_new_tokens); rows that are done (EOS, or all
their tokens) stop growing and ride along until the whole batch is done. Prompts may be ragged
(`prompt_lengths`, right-padded ids): row b then starts at N_b = its own length. The stream still yields one
[B] token at a time, each step as soon as every row has committed it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from deepseek_mini.model.sampling import sampling_probs


@dataclass
class SpeculativeStats:
    """Counts over all rows: a row proposes depth j's draft when it accepted depths 1..j-1 in that round."""

    proposed: list[int] = field(default_factory=list)  # per depth
    accepted: list[int] = field(default_factory=list)
    rounds: int = 0  # verification forwards (of the whole batch)
    row_rounds: list[int] = field(default_factory=list)  # per row: the verifications it took part in (not yet done)
    row_tokens: list[int] = field(default_factory=list)  # per row: tokens they committed (prefill's excluded)
    row_accepted: list[int] = field(default_factory=list)  # per row: drafts accepted

    def acceptance(self) -> list[float | None]:
        """Accepted / proposed per depth (depth 1 first): the conditional acceptance rate of each draft position
        (None for a depth never proposed)."""
        return [a / p if p else None for a, p in zip(self.accepted, self.proposed)]

    def tokens_per_round(self) -> float:
        """Tokens a row commits per verification it takes part in, over all rows."""
        return sum(self.row_tokens) / sum(self.row_rounds) if sum(self.row_rounds) else 0.0

    def tokens_per_round_per_row(self) -> list[float]:
        return [t / r if r else 0.0 for t, r in zip(self.row_tokens, self.row_rounds)]

    def as_dict(self) -> dict:
        return {"acceptance_per_depth": self.acceptance(), "proposed": list(self.proposed),
                "accepted": list(self.accepted), "rounds": self.rounds, "tokens_per_round": self.tokens_per_round(),
                "tokens_per_round_per_row": self.tokens_per_round_per_row()}


def check_speculative(model, temperature: float) -> None:
    """The model must have MTP modules to draft with; temperature as sample() takes it."""
    if not model.config.num_nextn_predict_layers:
        raise ValueError("speculative decoding drafts with the MTP modules, and this model has none "
                         "(model.num_nextn_predict_layers=0)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


def accept(p_d: torch.Tensor, q_d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Keep a draft d ~ q with probability min(1, p(d) / q(d)): u ~ U[0, 1) < p(d) / q(d)."""
    return u * q_d < p_d


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a rejected position draws from: norm(max(0, p - q)) [B, V] (unnormalised; multinomial scales it).
    Where p == q up to rounding there is no mass left (and a rejection had probability ~0): p itself."""
    r = (p - q).clamp_min(0)
    return torch.where(r.sum(-1, keepdim=True) > 0, r, p)


class _Drafter:
    """The MTP modules as a drafter: per depth a latent cache, a hidden-state buffer and a per-row valid frontier."""

    def __init__(self, model, batch: int, max_len: int, device, dtype):
        self.model = model
        self.caches = [m.block.self_attn.new_cache(batch, max_len, device, dtype) for m in model.mtp]
        D, d = len(model.mtp), model.config.hidden_size
        self.hidden = [torch.zeros(batch, max_len, d, device=device, dtype=dtype) for _ in range(D)]  # H_0..H_{D-1}
        self.valid = [torch.zeros(batch, dtype=torch.long, device=device) for _ in range(D)]

    def draft(self, tokens: torch.Tensor, N: torch.Tensor, n: int, sampler,
              live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts d_1..d_n [B, n] for x_{N_b+1}..x_{N_b+n} of every row b, written into tokens[b, N_b+1:N_b+n+1],
        and their distributions q [B, n, V] (None when greedy). hidden[0] must hold the trunk's states below N_b.

        Depth k recomputes positions valid_b..N_b-1 of each row as one [B, L] forward at per-row start positions
        s_b = max(N_b - L, 0), L the longest range a live row needs: the ranges end at N_b - 1 (a row whose N_b
        is below L runs a few positions past it, on whatever tokens lie there, which causality keeps away from
        everything before), so each row's draft is read at index N_b - 1 - s_b."""
        model, drafts, qs = self.model, [], []
        rows = torch.arange(N.shape[0], device=N.device)
        for k in range(1, n + 1):
            L = int(torch.where(live, N - self.valid[k - 1], 1).max())
            start = (N - L).clamp_min(0)
            pos = start[:, None] + torch.arange(L, device=N.device)  # [B, L]
            emb = model.model.embed_tokens(tokens.gather(1, pos + k))  # x_{i+k}: drafts at the tail for k >= 2
            h, _, _ = model.mtp[k - 1](self.hidden[k - 1][rows[:, None], pos], emb, pos, self.caches[k - 1], start)
            if k < len(self.hidden):
                self.hidden[k][rows[:, None], pos] = h
            self.valid[k - 1] = N - k + 1  # positions <= N-k read committed tokens only
            last = h[rows, N - 1 - start]
            logits = model.lm_head(model.mtp[k - 1].shared_head.norm(last))
            token, q = sampler(logits)
            tokens[rows, N + k] = token
            drafts.append(token)
            qs.append(q)
        return torch.stack(drafts, 1), (torch.stack(qs, 1) if qs[0] is not None else None)


@torch.no_grad()
def speculative_stream(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                       generator: torch.Generator | None = None, stats: SpeculativeStats | None = None,
                       prompt_lengths: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token [B] at a time, like DeepSeekV2.generate_stream, drafting with the MTP modules.
    `prompt_lengths` [B] (optional): row b's prompt is input_ids[b, :prompt_lengths[b]] (right-padded)."""
    check_speculative(model, temperature)
    D = model.config.num_nextn_predict_layers
    stats = stats if stats is not None else SpeculativeStats()
    stats.proposed = stats.proposed or [0] * D
    stats.accepted = stats.accepted or [0] * D
    B, T = input_ids.shape
    device, dtype = input_ids.device, model.lm_head.weight.dtype
    # prompt_lengths as generate_stream checked them
    lengths = torch.full((B,), T, device=device) if prompt_lengths is None else prompt_lengths.to(device).long()
    for name, v in (("row_rounds", 0), ("row_tokens", 0), ("row_accepted", 0)):
        setattr(stats, name, getattr(stats, name) or [v] * B)
    max_pos = model.config.max_position_embeddings
    if T + max_new_tokens > max_pos:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings={max_pos}")
    max_len = T + max_new_tokens + D  # a live row writes below N_b + D + 1 <= T + max_new_tokens + D - 1
    greedy = temperature == 0

    def draw(logits):  # a token [B] and, when sampling, the distribution it came from [B, V]
        if greedy:
            return logits.argmax(-1), None
        q = sampling_probs(logits, temperature, top_k, top_p)
        return torch.multinomial(q, 1, generator=generator).squeeze(1), q

    cache = model.new_cache(B, max_len, device=device)
    drafter = _Drafter(model, B, max_len, device, dtype)
    tokens = torch.zeros(B, max_len + 2 * D + 2, dtype=torch.long, device=device)  # committed, then drafts
    tokens[:, :T] = input_ids
    rows = torch.arange(B, device=device)

    h, _, _ = model.hidden_states(input_ids, cache, 0)  # prefill (a padded row's tail is overwritten unread)
    drafter.hidden[0][:, :T] = h
    token, _ = draw(model.lm_head(h[rows, lengths - 1]))
    N = lengths.clone()  # per row: x_{N_b} = the last committed token, not yet fed to the main model
    tokens[rows, N] = token
    out = torch.zeros(B, max_new_tokens + D + 1, dtype=torch.long, device=device)  # per row: its new tokens
    out[:, 0] = token
    committed = torch.ones(B, dtype=torch.long, device=device)  # new tokens per row, the first included
    hit_eos = token == eos_token_id if eos_token_id is not None else torch.zeros(B, dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # what the stream has emitted
    emitted = 0

    def columns():  # the steps every row has committed, emitted as plain generate_stream would
        nonlocal emitted
        ready = int(torch.where(hit_eos, max_new_tokens, committed).min())
        while emitted < ready:
            token = out[:, emitted].clone()
            if eos_token_id is not None:
                token = torch.where(finished | (committed <= emitted), torch.full_like(token, eos_token_id), token)
                finished.logical_or_(token == eos_token_id)
            emitted += 1
            yield token
            if emitted == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                return

    yield from columns()
    while True:
        live = ~hit_eos & (committed < max_new_tokens)
        if emitted == max_new_tokens or not bool(live.any()) or (eos_token_id is not None and bool(finished.all())):
            break
        left = max_new_tokens - committed  # per row: tokens still to commit
        n = min(D, int(torch.where(live, left, 1).max()) - 1)  # a round commits at most n + 1 tokens per row
        start = torch.where(live, N, 0)  # done rows ride along at position 0 (their cache is no longer read)
        n = min(n, max_pos - 1 - int(start.max()))
        if n > 0:
            drafts, q = drafter.draft(tokens, start, n, draw, live)
        else:
            drafts, q = tokens.new_zeros(B, 0), None
        pos = start[:, None] + torch.arange(n + 1, device=device)
        h, _, _ = model.hidden_states(tokens.gather(1, pos), cache, start)  # verify all n drafts in one forward
        drafter.hidden[0][rows[:, None], pos] = h
        logits = model.lm_head(h)  # [B, n + 1, V]: p_j predicts x_{N+1+j}
        if greedy:
            target = logits.argmax(-1)
            ok = drafts == target[:, :n]
        else:
            p = sampling_probs(logits, temperature, top_k, top_p)  # [B, n + 1, V]
            p_d = p[:, :n].gather(-1, drafts[..., None])[..., 0]
            q_d = q.gather(-1, drafts[..., None])[..., 0] if n else p_d
            u = torch.rand(B, n, generator=generator, device=device)
            ok = accept(p_d, q_d, u)
        accepted = ok.long().cumprod(1).sum(1)  # per row: the accepted prefix length
        m = torch.minimum(accepted, left - 1).clamp_min(0)  # what a row keeps: no more drafts than it has room for
        if greedy:
            last = target[rows, m]
        else:
            last = torch.multinomial(p[rows, m], 1, generator=generator).squeeze(1)  # m == n: p_{n+1}'s own sample
            if n:
                mq = m.clamp_max(n - 1)
                resampled = torch.multinomial(residual(p[rows, mq], q[rows, mq]), 1, generator=generator).squeeze(1)
                kept = accepted > m  # d_{m+1} accepted (the row ran out of room): that draft is its sample from p
                last = torch.where(m == n, last, torch.where(kept, drafts[rows, mq], resampled))
        # row b commits d_1..d_{m_b} (already in `tokens`) and `last` at N_b + m_b + 1; done rows commit nothing
        vals = torch.cat([drafts, drafts.new_zeros(B, 1)], 1)
        vals[rows, m] = last  # [B, n + 1]: the row's new tokens up to index m_b, then stale drafts
        tokens[rows[live], (N + m + 1)[live]] = last[live]
        out[rows[live, None], committed[live, None] + torch.arange(n + 1, device=device)] = vals[live]
        if eos_token_id is not None:
            new = torch.arange(n + 1, device=device)[None, :] <= m[:, None]
            hit_eos |= live & ((vals == eos_token_id) & new).any(1)
        # statistics, in one device-to-host copy: depth j+1 was proposed to a live row that accepted depths
        # 1..j and had room for it, and accepted if it was too
        j = torch.arange(n, device=device)[None, :]
        room = live[:, None] & (j < (left - 1)[:, None])
        host = torch.cat([(room & (accepted[:, None] >= j)).sum(0), (room & (accepted[:, None] > j)).sum(0),
                          live.long(), m]).tolist()
        stats.rounds += 1
        for d in range(n):
            stats.proposed[d] += host[d]
            stats.accepted[d] += host[n + d]
        for b in range(B):
            if host[2 * n + b]:
                stats.row_rounds[b] += 1
                stats.row_tokens[b] += host[2 * n + B + b] + 1
                stats.row_accepted[b] += host[2 * n + B + b]
        N = torch.where(live, N + m + 1, N)
        committed = torch.where(live, committed + m + 1, committed)
        yield from columns()

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
Each MTP depth keeps its own latent cache and hidden-state buffer with a frontier `valid[k]`: positions below
it were computed from committed tokens only; a round recomputes depth k from there to N-1 (its last k-1
positions read drafts, so they are redone next round).

Batch > 1: all rows share one cache position, so a round commits the smallest accepted prefix of the batch
(plus one token each). Each row's tokens are still exactly its own greedy / sampled continuation (a row that
accepted further simply takes its accepted draft as its correction token), but the batch advances at the pace
of its least lucky row. The acceptance statistics are per row and depth, as if each row ran alone.
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
    rounds: int = 0  # verification forwards
    tokens: int = 0  # tokens committed per row, summed over rounds (prefill's first token excluded)

    def acceptance(self) -> list[float | None]:
        """Accepted / proposed per depth (depth 1 first): the conditional acceptance rate of each draft position
        (None for a depth never proposed)."""
        return [a / p if p else None for a, p in zip(self.accepted, self.proposed)]

    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        return {"acceptance_per_depth": self.acceptance(), "proposed": list(self.proposed),
                "accepted": list(self.accepted), "rounds": self.rounds, "tokens_per_round": self.tokens_per_round()}


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
    """The MTP modules as a drafter: per depth a latent cache, a hidden-state buffer and a valid frontier."""

    def __init__(self, model, batch: int, max_len: int, device, dtype):
        self.model = model
        self.caches = [m.block.self_attn.new_cache(batch, max_len, device, dtype) for m in model.mtp]
        D, d = len(model.mtp), model.config.hidden_size
        self.hidden = [torch.zeros(batch, max_len, d, device=device, dtype=dtype) for _ in range(D)]  # H_0..H_{D-1}
        self.valid = [0] * D

    def draft(self, tokens: torch.Tensor, N: int, n: int, sampler) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts d_1..d_n [B, n] for x_{N+1}..x_{N+n}, written into tokens[:, N+1:N+n+1], and their
        distributions q [B, n, V] (None when greedy). hidden[0] must hold the trunk's states below N."""
        model, drafts, qs = self.model, [], []
        for k in range(1, n + 1):
            start = self.valid[k - 1]
            positions = torch.arange(start, N, device=tokens.device)
            emb = model.model.embed_tokens(tokens[:, start + k:N + k])  # x_{i+k}: drafts at the tail for k >= 2
            h, _, _ = model.mtp[k - 1](self.hidden[k - 1][:, start:N], emb, positions, self.caches[k - 1], start)
            if k < len(self.hidden):
                self.hidden[k][:, start:N] = h
            self.valid[k - 1] = N - k + 1  # positions <= N-k read committed tokens only
            logits = model.lm_head(model.mtp[k - 1].shared_head.norm(h[:, -1]))
            token, q = sampler(logits)
            tokens[:, N + k] = token
            drafts.append(token)
            qs.append(q)
        return torch.stack(drafts, 1), (torch.stack(qs, 1) if qs[0] is not None else None)


@torch.no_grad()
def speculative_stream(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                       generator: torch.Generator | None = None,
                       stats: SpeculativeStats | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token [B] at a time, like DeepSeekV2.generate_stream, drafting with the MTP modules."""
    check_speculative(model, temperature)
    D = model.config.num_nextn_predict_layers
    stats = stats if stats is not None else SpeculativeStats()
    stats.proposed = stats.proposed or [0] * D
    stats.accepted = stats.accepted or [0] * D
    B, T = input_ids.shape
    max_len = T + max_new_tokens  # verification never writes past T + max_new_tokens - 2 (drafts <= tokens left - 1)
    if max_len > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    device, dtype = input_ids.device, model.lm_head.weight.dtype
    greedy = temperature == 0

    def draw(logits):  # a token [B] and, when sampling, the distribution it came from [B, V]
        if greedy:
            return logits.argmax(-1), None
        q = sampling_probs(logits, temperature, top_k, top_p)
        return torch.multinomial(q, 1, generator=generator).squeeze(1), q

    cache = model.new_cache(B, max_len, device=device)
    drafter = _Drafter(model, B, max_len, device, dtype)
    tokens = torch.zeros(B, max_len + D + 1, dtype=torch.long, device=device)  # committed, then drafts
    tokens[:, :T] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)

    def emit(token):
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished.logical_or_(token == eos_token_id)
        return token

    h, _, _ = model.hidden_states(input_ids, cache, 0)  # prefill
    drafter.hidden[0][:, :T] = h
    token, _ = draw(model.lm_head(h[:, -1]))
    tokens[:, T] = token
    yield emit(token)
    emitted, N = 1, T  # x_N = the last committed token, not yet fed to the main model
    while emitted < max_new_tokens and not (eos_token_id is not None and bool(finished.all())):
        n = min(D, max_new_tokens - emitted - 1)  # a round commits at most n + 1 tokens
        if n == 0:  # one token left: a plain decode step
            h, _, _ = model.hidden_states(tokens[:, N:N + 1], cache, N)
            token, _ = draw(model.lm_head(h[:, -1]))
            yield emit(token)
            return
        drafts, q = drafter.draft(tokens, N, n, draw)
        h, _, _ = model.hidden_states(tokens[:, N:N + n + 1], cache, N)  # verify all n drafts in one forward
        drafter.hidden[0][:, N:N + n + 1] = h
        logits = model.lm_head(h)  # [B, n + 1, V]: p_j predicts x_{N+1+j}
        if greedy:
            target = logits.argmax(-1)
            ok = drafts == target[:, :n]
        else:
            p = sampling_probs(logits, temperature, top_k, top_p)  # [B, n + 1, V]
            p_d = p[:, :n].gather(-1, drafts[..., None])[..., 0]
            q_d = q.gather(-1, drafts[..., None])[..., 0]
            u = torch.rand(B, n, generator=generator, device=device)
            ok = accept(p_d, q_d, u)
        accepted = ok.long().cumprod(1).sum(1)  # per row: the accepted prefix length
        live = ~finished
        for j in range(n):
            stats.proposed[j] += int((live & (accepted >= j)).sum())
            stats.accepted[j] += int((live & (accepted >= j + 1)).sum())
        m = int(accepted.min())  # all rows keep d_1..d_m; position m gets each row's own token
        if greedy:
            last = target[:, m]
        elif m == n:
            last = torch.multinomial(p[:, n], 1, generator=generator).squeeze(1)
        else:
            resampled = torch.multinomial(residual(p[:, m], q[:, m]), 1, generator=generator).squeeze(1)
            kept = accepted > m  # this row accepted d_{m+1}: that draft is its sample from p
            last = torch.where(kept, drafts[rows, m], resampled)
        new = torch.cat([drafts[:, :m], last[:, None]], 1)
        tokens[:, N + 1:N + m + 2] = new
        stats.rounds += 1
        stats.tokens += m + 1
        for j in range(m + 1):
            yield emit(new[:, j])
            emitted += 1
            if eos_token_id is not None and bool(finished.all()):
                return
        N += m + 1

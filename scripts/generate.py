"""Stream a continuation from a checkpoint, on CPU or GPU.

    python scripts/generate.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt prompt="Once upon a time" \
        max_new_tokens=100 temperature=0.8 top_k=50 [top_p=0.9] [device=cuda] [mla_decode=naive] [speculative=true]

Prefill runs once; every new token is one cached decode step on the preallocated (static) cache: the
compressed latent cache for MLA, decoded with the absorbed path by default. Text is printed as it is
generated (stdout); a last line on stderr reports tokens/s and the KV cache in use. A prompt that Hydra's
override grammar rejects (parentheses, commas, ...) can come from a file: prompt_file=<path>, or
prompt_file=- for stdin.

speculative=true (a checkpoint trained with model.num_nextn_predict_layers >= 1) drafts the next D tokens with
the MTP modules and verifies them in one forward of the main model (deepseek_mini/model/speculative.py): the
same text as plain decoding at temperature=0, the same distribution when sampling; the statistics line adds
the acceptance rate per draft depth.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from deepseek_mini.analysis.kv_cache import human_bytes  # noqa: E402
from deepseek_mini.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from deepseek_mini.config import ConfigError  # noqa: E402
from deepseek_mini.generation_args import (  # noqa: E402
    check_flag,
    check_length,
    check_sampling,
    check_seed,
    check_speculative,
    parse_device,
    read_prompt,
)
from deepseek_mini.model.speculative import SpeculativeStats  # noqa: E402

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
EOS = "<|endoftext|>"


class UsageError(ValueError):
    """A bad argument; printed as one line."""


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"dtype={name!r}: choose auto, fp32, bf16 or fp16")
    return DTYPES[name]


class StreamPrinter:
    """Decode the whole generated id list each step and print only the new suffix (byte-level BPE tokens
    can end mid-character; a trailing U+FFFD is held back until the character completes)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tok, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return
        self._emit(text)

    def _emit(self, text: str) -> None:
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def finish(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        self._emit(text)
        return text


def run(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise UsageError("ckpt_path is required: python scripts/generate.py ckpt_path=<run>/checkpoints/last.ckpt")
    # every setting before anything is loaded, by the same rules as eval.py (deepseek_mini/generation_args.py)
    check_sampling(cfg)
    seed = check_seed(cfg)
    speculative, stop_at_eos = check_flag(cfg, "speculative", False), check_flag(cfg, "stop_at_eos", True)
    print_prompt = check_flag(cfg, "print_prompt", True)
    path = Path(str(cfg.ckpt_path))
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if cfg.mla_decode not in ("absorb", "naive"):
        raise UsageError(f"mla_decode={cfg.mla_decode!r}: choose absorb or naive")
    max_new, temperature = int(cfg.max_new_tokens), float(cfg.temperature)
    prompt = read_prompt(cfg)  # prompt=..., or prompt_file=<path> / prompt_file=- (stdin)
    device = parse_device(cfg.device)
    dtype = pick_dtype(str(cfg.dtype), device)

    loaded = load_checkpoint(path)
    check_speculative(speculative, loaded.config.num_nextn_predict_layers)  # the MTP modules are the drafter
    if loaded.tokenizer is None:
        folder = path if path.is_dir() else path.parent
        raise CheckpointError(f"no tokenizer.json beside {path} (looked in {folder} and {folder.parent})")
    model, mcfg, tok = loaded.model.to(device=device, dtype=dtype).eval(), loaded.config, loaded.tokenizer
    model.set_mla_decode(str(cfg.mla_decode))

    ids = tok.encode(prompt).ids
    eos_id = tok.token_to_id(EOS)
    if not ids:
        if eos_id is None:
            raise UsageError("empty prompt and the tokenizer has no <|endoftext|> to start from")
        ids = [eos_id]
    check_length(len(ids), max_new, mcfg.max_position_embeddings)

    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    top_k = int(cfg.top_k) if cfg.top_k else None
    top_p = float(cfg.top_p) if cfg.top_p is not None else None
    if print_prompt:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    printer = StreamPrinter(tok)
    input_ids = torch.tensor([ids], device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    t_first = None
    spec = SpeculativeStats()
    with torch.inference_mode():
        for token in model.generate_stream(input_ids, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                                           eos_token_id=eos_id if stop_at_eos else None, generator=generator,
                                           speculative=speculative, stats=spec):
            token_id = int(token[0])  # a host sync, once per token: the text is streamed as it comes
            if t_first is None:
                t_first = time.perf_counter()
            if stop_at_eos and token_id == eos_id:
                break
            printer.push(token_id)
    sync()
    t_end = time.perf_counter()
    printer.finish()
    n_new = len(printer.ids)
    decode_s = t_end - (t_first or t_end)
    elem = torch.empty((), dtype=dtype).element_size()
    cache_len = len(ids) + max_new  # the static cache generate_stream preallocates
    per_token = mcfg.kv_cache_bytes_per_token(elem)
    kind = (f"MLA latent cache, {cfg.mla_decode} decode" if mcfg.attention == "mla"
            else f"{mcfg.attention.upper()} K/V cache, {mcfg.num_key_value_heads} KV heads")
    rate = f"{(n_new - 1) / decode_s:.1f} tokens/s decode" if n_new > 1 and decode_s > 0 else "n/a tokens/s"
    if speculative:
        rates = ", ".join(f"{r:.0%}" if r is not None else "n/a" for r in spec.acceptance())
        kind += (f", speculative: {mcfg.num_nextn_predict_layers} MTP draft(s), acceptance per depth {rates}, "
                 f"{spec.tokens_per_round():.2f} tokens per verification")
    sys.stdout.write("\n")
    sys.stdout.flush()
    # the statistics go to stderr: `generate.py ... > out.txt` keeps only the text
    print(f"[{n_new} new tokens in {t_end - t0:.2f}s ({rate}, prompt {len(ids)} tokens, prefill+first token "
          f"{(t_first or t_end) - t0:.3f}s) | KV cache: {human_bytes(per_token * cache_len)} for {cache_len} tokens "
          f"({per_token:,.0f} B/token, {kind}, {str(dtype).split('.')[-1]}) | {device}]", file=sys.stderr, flush=True)


@hydra.main(version_base="1.3", config_path="../configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (UsageError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    from deepseek_mini.training.reliability import cli_entry  # one-line errors for bad overrides, as train.py

    cli_entry(main, str(Path(__file__).resolve().parents[1] / "configs"), "generate")()

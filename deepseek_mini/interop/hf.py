"""Hugging Face interop: export to / import from transformers' built-in DeepseekV2 layout.

    export_hf(model, out_dir, tokenizer)       config.json + model.safetensors (+ tokenizer files) that
                                               `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`
                                               loads with no custom code and the same logits
    load_hf_directory(path)                    such a directory, or one laid out like DeepSeek-V2-Lite's
                                               hub checkpoint, as a DeepSeekV2
    from_pretrained(path) / save_pretrained(model, out_dir)   the same two, under transformers' names

A one-way adapter: it imports the model, the model never imports it. The config.json half (config_to_hf,
config_from_hf and their refusals) is in hf_config.py; this file holds the weights, the directory and the tokenizer.

The two layouts differ in one place only: we stack the routed experts (`mlp.experts.gate_up_proj`
[E, 2I, D], gate rows first; `mlp.experts.down_proj` [E, D, I]); the hub stores them one by one
(`mlp.experts.{e}.{gate,up,down}_proj.weight`). We write the per-expert names, which transformers v4 and
v5 both load (v5 fuses them at load time), and read either form.

Multi-token prediction modules (model/mtp.py, `mtp.{k}.*`) are written where DeepSeek-V3's checkpoint keeps them:
as extra layers `model.layers.{num_hidden_layers + k}.*` (`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, and
the block's own names), with `num_nextn_predict_layers` in config.json. transformers' DeepseekV2 builds
num_hidden_layers layers only: it loads the main model and discards those weights (a warning about unused
weights); reading the directory back here restores them. The shared embedding and head are not repeated per
module (DeepSeek-V3's release repeats them; such copies are accepted on import when equal to the main ones).

What transformers' DeepseekV2 cannot express is refused (HFExportError / HFImportError, the message names
the field) rather than exported into a model that silently computes something else; docs/hf_interop.md
lists every rule. transformers is never imported here: the files are plain JSON and safetensors.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

from deepseek_mini.config import ConfigError, ModelConfig
from deepseek_mini.interop.hf_config import HFExportError, HFImportError, config_from_hf, config_to_hf
from deepseek_mini.model import DeepSeekV2

__all__ = ["HFExportError", "HFImportError", "config_from_hf", "config_to_hf", "export_hf", "from_pretrained",
           "load_hf_directory", "read_hf_state_dict", "save_pretrained", "state_dict_from_hf", "state_dict_to_hf",
           "write_hf_tokenizer"]

# end-of-document token names, in order of preference (ours is <|endoftext|>, id 0)
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_RE = re.compile(r"^mtp\.(\d+)\.(block\.)?(.*)$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.")  # an MTP module's parts outside its block


def _mtp_name_to_hf(name: str, num_layers: int) -> str:
    """mtp.{k}.block.X / mtp.{k}.enorm.weight -> model.layers.{num_layers + k}.X / .enorm.weight"""
    m = _MTP_RE.match(name)
    return f"model.layers.{num_layers + int(m.group(1))}.{m.group(3)}" if m else name


def _mtp_name_from_hf(name: str, num_layers: int) -> str:
    """The inverse of _mtp_name_to_hf for layers >= num_layers (other names unchanged)."""
    m = _LAYER_RE.match(name)
    if not m or int(m.group(1)) < num_layers:
        return name
    k, rest = int(m.group(1)) - num_layers, m.group(2)
    return f"mtp.{k}.{rest}" if rest.startswith(_MTP_OWN) else f"mtp.{k}.block.{rest}"


# ---------------------------------------------------------------------- weights
def state_dict_to_hf(model) -> dict[str, torch.Tensor]:
    """Our state dict under the hub's names: stacked experts split per expert, lm_head left out when tied
    (transformers re-ties it to model.embed_tokens.weight). Tensors are contiguous and unshared."""
    cfg = model.config
    config_to_hf(cfg)  # refuse what cannot be expressed before touching weights
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        name = _mtp_name_to_hf(name.replace("_orig_mod.", ""), cfg.num_hidden_layers)
        t = t.detach()
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith("mlp.gate.e_score_correction_bias"):
            raise HFExportError(f"{name}: transformers' DeepseekV2 has no expert score-correction bias")
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone().contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone().contiguous()
            continue
        if name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone().contiguous()
            continue
        out[name] = t.clone().contiguous()
    return out


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A hub / transformers DeepseekV2 state dict in our layout. Accepts per-expert names
    (`mlp.experts.{e}.gate_proj.weight` ...) and transformers v5's fused `mlp.experts.gate_up_proj` /
    `mlp.experts.down_proj` (already ours). A missing lm_head is the tied embedding."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, t in sd.items():
        if name.endswith("rotary_emb.inv_freq"):  # older exports save RoPE buffers; ours are rebuilt
            continue
        m = _EXPERT_RE.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
        else:
            out[name] = t
    for prefix, parts in experts.items():
        n = cfg.n_routed_experts or 0
        for kind in ("gate_proj", "up_proj", "down_proj"):
            have = sorted(parts.get(kind, {}))
            if have != list(range(n)):
                raise HFImportError(f"{prefix}: expected {kind} for experts 0..{n - 1}, found {len(have)} "
                                    f"({have[:3]}...)")
        gate = torch.stack([parts["gate_proj"][e] for e in range(n)])
        up = torch.stack([parts["up_proj"][e] for e in range(n)])
        out[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"{prefix}.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(n)])
    if cfg.tie_word_embeddings:
        # transformers ties lm_head to the embedding whatever the file holds
        if "model.embed_tokens.weight" in out:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
    renamed = {}
    for name, t in out.items():
        name = _mtp_name_from_hf(name, cfg.num_hidden_layers)
        shared = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
        m = _MTP_RE.match(name)
        if m and m.group(3) in shared:  # DeepSeek-V3's per-module copies of the shared weights
            main = out.get(shared[m.group(3)])
            if main is None or main.shape != t.shape or not torch.equal(main, t):
                raise HFImportError(f"{name}: an MTP module's own {m.group(3)} differs from the main model's; "
                                    "deepseek-mini's MTP modules share the embedding and the head")
            continue
        renamed[name] = t
    return renamed


def check_safetensors_file(path: str | os.PathLike) -> Path:
    """A complete safetensors file: its JSON header parses and the tensor data it describes fills the file
    exactly (a truncated or padded file is refused). The format has no checksum, so a flipped bit inside the
    tensor data cannot be detected; a flipped bit in the header can."""
    path = Path(path)
    why = "cannot read weights"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HFImportError(f"{why} {path}: truncated ({size} bytes, shorter than the safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise HFImportError(f"{why} {path}: truncated or not safetensors (header of {n:,} bytes in a "
                                    f"{size:,}-byte file)")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except HFImportError:
        raise
    except Exception as e:  # UnicodeDecodeError, JSONDecodeError, KeyError, OSError, ...
        raise HFImportError(f"{why} {path}: not a safetensors file ({type(e).__name__}: {_first_line(e)})") from None
    data = size - 8 - n
    if data != max(ends, default=0):
        state = "truncated" if data < max(ends, default=0) else "longer than its header describes"
        raise HFImportError(f"{why} {path}: {state} (the header describes {max(ends, default=0):,} bytes of tensor "
                            f"data, the file has {data:,})")
    return path


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a directory: model.safetensors, a sharded *.safetensors.index.json, or any *.safetensors."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise HFImportError(f"{path}: no *.safetensors weights (pytorch_model.bin is not read; convert it first)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not (path / f).is_file():
            raise HFImportError(f"{path}: shard {f} named in the index is missing")
        sd.update(load_file(str(check_safetensors_file(path / f))))  # truncation / not safetensors: one line
    return sd


def load_hf_directory(path: str | os.PathLike, dtype: torch.dtype | None = None) -> DeepSeekV2:
    """A DeepSeekV2 (eval mode) from a Hugging Face DeepseekV2 directory: config.json + safetensors.
    Weights keep the model's fp32 parameters unless `dtype` is given."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise HFImportError(f"path={path!r}: give a Hugging Face model directory (config.json + safetensors)")
    path = Path(path)
    if not path.is_dir():
        raise HFImportError(f"{path}: {'not found' if not path.exists() else 'a file, not a directory'} (give a Hugging "
                            "Face model directory: config.json + safetensors; a .ckpt of ours: checkpoint.load_checkpoint)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise HFImportError(f"{path}: no config.json")
    try:
        cfg = config_from_hf(json.loads(cfg_file.read_text()))
    except HFImportError:
        raise
    except ConfigError as e:  # a value ModelConfig refuses: name the file it came from
        raise HFImportError(f"{cfg_file}: {e}") from None
    except Exception as e:  # not JSON, a field missing (KeyError), a word where a number belongs (ValueError), ...
        raise HFImportError(f"cannot read {cfg_file}: {type(e).__name__}: {_first_line(e)}") from None
    sd = state_dict_from_hf(read_hf_state_dict(path), cfg)
    model = DeepSeekV2(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise HFImportError(f"{path}: weights do not match config.json: missing {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise HFImportError(f"{path}: {k} has shape {tuple(v.shape)}, "
                                f"config.json implies {tuple(expected[k].shape)}")
    model.load_state_dict(sd)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# ---------------------------------------------------------------------- tokenizer + export
def _special_token(tok, candidates=_EOS_CANDIDATES) -> tuple[str | None, int | None]:
    for name in candidates:
        i = tok.token_to_id(name)
        if i is not None:
            return name, i
    return None, None


def write_hf_tokenizer(tokenizer, out_dir: str | os.PathLike, model_max_length: int | None = None) -> list[Path]:
    """tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast, bos = eos = <|endoftext|>) +
    special_tokens_map.json, so `AutoTokenizer.from_pretrained(out_dir)` loads it offline and encodes exactly
    as the `tokenizers.Tokenizer` does (no special tokens are added around the text)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_file(str(tokenizer))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    eos, _ = _special_token(tokenizer)
    special = {"bos_token": eos, "eos_token": eos} if eos else {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if model_max_length:
        config["model_max_length"] = model_max_length
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return [out / "tokenizer.json", out / "tokenizer_config.json", out / "special_tokens_map.json"]


def export_hf(model, out_dir: str | os.PathLike, tokenizer=None) -> list[Path]:
    """Write config.json + model.safetensors (+ tokenizer files) for transformers' DeepseekV2.

    Refuses (HFExportError) before writing anything if the config cannot be expressed. Returns the paths."""
    from safetensors.torch import save_file

    bos = eos = None
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer))
        _, eos = _special_token(tokenizer)
        bos = eos
    sd = state_dict_to_hf(model)  # also validates the config
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    dtype = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    config = config_to_hf(model.config, bos_token_id=bos, eos_token_id=eos, torch_dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    os.chmod(out / "model.safetensors", (out / "config.json").stat().st_mode & 0o777)  # safetensors wrote 0600
    written = [out / "config.json", out / "model.safetensors"]
    if tokenizer is not None:
        written += write_hf_tokenizer(tokenizer, out, model_max_length=model.config.max_position_embeddings)
    return written


# ---------------------------------------------------------------------- transformers' names
def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None) -> DeepSeekV2:
    """Load a Hugging Face DeepseekV2 directory (config.json + safetensors) as a DeepSeekV2: load_hf_directory."""
    return load_hf_directory(path, dtype=dtype)


def save_pretrained(model: DeepSeekV2, out_dir: str | os.PathLike, tokenizer=None) -> list[Path]:
    """Write a directory transformers' AutoModelForCausalLM loads with no custom code: export_hf."""
    return export_hf(model, out_dir, tokenizer=tokenizer)

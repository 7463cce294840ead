"""Which weights AlphaToken scores: the weight matrices that train, inside the last K decoder blocks.

- Full fine-tuning: the weight of every `nn.Linear` inside the last K blocks (attention q/k/v/o and
  MLP projections). Embeddings, lm_head, norms and biases are not scored.
- LoRA (peft): when the model carries LoRA-adapted linears, the scored weights are the factors of
  every active adapter inside the last K blocks, `lora_A` (r, d_in) and `lora_B` (d_out, r), both
  `nn.Linear`s. An adapted projection computes `z = W0 x + s B (A x)` (peft: `base_layer(x) +
  scaling * lora_B(lora_A(dropout(x)))`); its frozen base weight W0 does not train and is not
  scored, nor is a linear without adapter.

Hybrid decoders (Qwen-3.5: Gated-DeltaNet linear-attention blocks between softmax-attention
blocks, `config.layer_types`): "the last K blocks" are the last K decoder blocks whatever their token
mixer, so the scored weights are the same set for valuation, Fisher and training on every
architecture. Each block's token mixer (`token_mixer`) decides which terms of METHOD.md it carries:
- softmax attention (a module owning `v_proj` and `o_proj`): the direct path of all its linears and
  the causal value path of Eq. 9 through its attention probabilities A_h;
- Gated DeltaNet (`linear_attn`: `in_proj_qkv`, `in_proj_z`, `in_proj_a`, `in_proj_b`, `conv1d`,
  `out_proj`): the direct path of its linears only. It has no attention probabilities: its value
  vectors reach later positions through a recurrent state, and Eq. 9's A_h[k, p] is not defined
  for it, so no causal term is invented. Its errors e_p are exact under both signals (for `self`
  the valuation re-runs it with the gradient kept on the own position, `valuation.linear_attention`).
Any other token mixer (a block with neither) is refused by the valuation.

Multimodal wrappers (`Gemma3ForConditionalGeneration`, `Qwen3_5ForConditionalGeneration`, ...): the
decoder blocks are those of the text decoder (`model.language_model.layers`); the vision tower is
never scored.

Shared by valuation, Fisher and training so they agree on one definition."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


# where the decoder blocks sit, relative to the model or one of its wrappers' inner models; the text
# decoder of a multimodal `*ForConditionalGeneration` is its `language_model` (the vision encoder's
# own layers are under other names and never matched)
DECODER_PATHS = ("model.layers", "layers", "model.language_model.layers", "language_model.layers",
                 "transformer.h", "gpt_neox.layers")
SOFTMAX_ATTENTION, LINEAR_ATTENTION = "attention", "linear_attention"
GATED_DELTANET_PARTS = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "conv1d", "out_proj", "A_log", "dt_bias")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM, wrapped or not (PEFT, DDP), or of the text
    decoder of a multimodal `*ForConditionalGeneration` model."""
    candidates = [model]
    for attr in ("module", "base_model", "model"):  # DDP, PEFT wrappers, then the usual nesting
        nested = [getattr(c, attr) for c in candidates if isinstance(getattr(c, attr, None), nn.Module)]
        candidates += nested
    for candidate in candidates:
        for path in DECODER_PATHS:
            obj = candidate
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, nn.ModuleList) and len(obj) > 0:
                return obj
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}: expected a ModuleList at "
        "`model.layers` (Llama/Qwen/Gemma/Mistral style) or `model.language_model.layers` (multimodal wrappers)"
    )


def _is_projection(module) -> bool:
    return isinstance(module, nn.Linear) or is_lora_layer(module)


def token_mixer(block: nn.Module, where: str = "") -> tuple[str, nn.Module]:
    """`(kind, module)` of a decoder block's token mixer (module docstring): `SOFTMAX_ATTENTION` and
    the submodule owning `v_proj` and `o_proj` (plain or LoRA-adapted linears), or `LINEAR_ATTENTION`
    and a Gated DeltaNet (`linear_attn` of Qwen-3.5). Raises ValueError, naming `where`, otherwise."""
    for module in block.modules():
        if _is_projection(getattr(module, "v_proj", None)) and _is_projection(getattr(module, "o_proj", None)):
            return SOFTMAX_ATTENTION, module
    for module in block.modules():
        if all(hasattr(module, part) for part in GATED_DELTANET_PARTS):
            return LINEAR_ATTENTION, module
    raise ValueError(
        f"{where or type(block).__name__}: the valuation knows softmax attention (a module with `v_proj` and "
        "`o_proj` linears) and Gated-DeltaNet linear attention (Qwen-3.5 `linear_attn`); this block has neither"
    )


def scored_blocks(model: nn.Module, last_k: int) -> list[tuple[int, nn.Module]]:
    """`(index, block)` for the last `last_k` decoder blocks."""
    blocks = decoder_blocks(model)
    if not 1 <= last_k <= len(blocks):
        raise ValueError(f"last_k={last_k} must be between 1 and the number of decoder blocks ({len(blocks)})")
    return [(i, blocks[i]) for i in range(len(blocks) - last_k, len(blocks))]


def is_lora_layer(module: nn.Module) -> bool:
    """A LoRA-adapted linear (peft `lora.Linear`): a frozen `base_layer` plus ModuleDicts `lora_A`,
    `lora_B` of factor linears, one per adapter."""
    return (isinstance(getattr(module, "base_layer", None), nn.Linear)
            and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict))


@dataclass(frozen=True)
class LoraFactors:
    """One active adapter of a LoRA-adapted linear: `z = W0 x + scaling * lora_B(lora_A(dropout(x)))`."""

    adapter: str  # adapter name ("default" for a single peft adapter)
    lora_A: nn.Linear  # weight (r, d_in)
    lora_B: nn.Linear  # weight (d_out, r)
    scaling: float  # s = lora_alpha / r (or alpha / sqrt(r) with rsLoRA)
    dropout: nn.Module  # applied to x before lora_A (nn.Identity when lora_dropout = 0)


def lora_factors(layer: nn.Module, where: str = "") -> list[LoraFactors]:
    """The adapters that take part in the forward of a LoRA-adapted linear (see `is_lora_layer`).
    Raises ValueError, naming `where`, for the states in which the factors are not the plain
    `s B A x` term of the forward: merged into the base weight, adapters disabled, or a LoRA variant
    (DoRA and the like)."""
    name = where or type(layer).__name__
    if getattr(layer, "merged", False):
        raise ValueError(f"{name}: the LoRA adapters are merged into the base weight, so their factors are "
                         "not in the forward; unmerge them to score or train the factors")
    if getattr(layer, "disable_adapters", False):
        raise ValueError(f"{name}: the LoRA adapters are disabled; enable them to score their factors")
    active = getattr(layer, "active_adapters", None) or list(layer.lora_A.keys())
    factors = []
    for adapter in active:
        if adapter not in layer.lora_A:
            continue
        if adapter in getattr(layer, "lora_variant", {}):
            raise ValueError(f"{name}: adapter {adapter!r} is a LoRA variant "
                             f"({type(layer.lora_variant[adapter]).__name__}); only plain LoRA factors can be scored")
        dropout = layer.lora_dropout[adapter] if adapter in getattr(layer, "lora_dropout", {}) else nn.Identity()
        factors.append(LoraFactors(adapter, layer.lora_A[adapter], layer.lora_B[adapter],
                                   float(layer.scaling[adapter]), dropout))
    return factors


def scored_linears(model: nn.Module, last_k: int) -> dict[str, nn.Linear]:
    """Parameter name of the weight (as in `model.named_parameters()`) -> its `nn.Linear`, in model
    order: every linear inside the last `last_k` blocks, or, when the model carries LoRA adapters,
    the `lora_A` and `lora_B` factor linears of the active adapters inside those blocks."""
    blocks = scored_blocks(model, last_k)
    if any(is_lora_layer(m) for m in model.modules()):
        names = {id(m): n for n, m in model.named_modules()}
        wanted = set()
        for _, block in blocks:
            for layer in block.modules():
                if is_lora_layer(layer):
                    for f in lora_factors(layer, names.get(id(layer), "")):
                        wanted |= {id(f.lora_A), id(f.lora_B)}
        if not wanted:
            raise ValueError(f"the model carries LoRA adapters but none inside the last {last_k} decoder blocks: "
                             "nothing that trains can be scored there")
    else:
        wanted = {id(m) for _, block in blocks for m in block.modules() if isinstance(m, nn.Linear)}
    by_name = {}
    for name, module in model.named_modules():
        if id(module) in wanted:
            by_name[f"{name}.weight" if name else "weight"] = module
    return by_name

"""Which weights AlphaToken scores: the weight matrices that train, inside the last K decoder blocks.

- Full fine-tuning: the weight of every `nn.Linear` inside the last K blocks (attention q/k/v/o and
  MLP projections). Embeddings, lm_head, norms and biases are not scored.
- LoRA (peft): when the model carries LoRA-adapted linears, the scored weights are the factors of
  every active adapter inside the last K blocks, `lora_A` (r, d_in) and `lora_B` (d_out, r), both
  `nn.Linear`s. An adapted projection computes `z = W0 x + s B (A x)` (peft: `base_layer(x) +
  scaling * lora_B(lora_A(dropout(x)))`); its frozen base weight W0 does not train and is not
  scored, nor is a linear without adapter.

Shared by valuation, Fisher and training so they agree on one definition."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face decoder-only causal LM, wrapped or not (PEFT, DDP)."""
    candidates = [model]
    for attr in ("module", "base_model", "model"):  # DDP, PEFT wrappers, then the usual nesting
        nested = [getattr(c, attr) for c in candidates if isinstance(getattr(c, attr, None), nn.Module)]
        candidates += nested
    for candidate in candidates:
        for path in ("model.layers", "layers", "transformer.h", "gpt_neox.layers"):
            obj = candidate
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, nn.ModuleList) and len(obj) > 0:
                return obj
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}: expected a ModuleList at "
        "`model.layers` (Llama/Qwen/Gemma/Mistral style)"
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

"""Which weights AlphaToken scores: the weight matrices of every `nn.Linear` inside the last K
decoder blocks (attention q/k/v/o and MLP projections). Embeddings, lm_head, norms and biases are
not scored. Shared by valuation, Fisher and training so they agree on one definition."""

from __future__ import annotations

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


def scored_linears(model: nn.Module, last_k: int) -> dict[str, nn.Linear]:
    """Parameter name of the weight (as in `model.named_parameters()`) -> its `nn.Linear`, for every
    linear inside the last `last_k` blocks, in model order."""
    wanted = {id(m) for _, block in scored_blocks(model, last_k) for m in block.modules() if isinstance(m, nn.Linear)}
    by_name = {}
    for name, module in model.named_modules():
        if id(module) in wanted:
            by_name[f"{name}.weight" if name else "weight"] = module
    return by_name

"""What some baseline token policies read beyond the per-token losses: attention probabilities of a
forward (ssToken, XTF), and per-example values computed once before the first update from the
reference model over the whole training set (FLOW's sample weights, XTF's noise masks).

Conventions as in `alphatoken.losses`: a feature is `{"input_ids", "labels"}` (lists, labels -100
off the response); loss position `p` predicts token `t = p + 1`; per-example step-0 values are
`(len - 1,)` tensors over loss positions, 0 where `labels[p + 1] == -100`.

- `AttentionCapture`: during one forward, the attention probabilities `A[b, h, q, k]` (query q, key
  k) of chosen decoder blocks, or a reduction of them computed as each block runs, whatever kernel
  the model uses (sdpa or eager): the chosen blocks run the project's eager attention
  (`alphatoken.valuation.attention.capturing_attention`, forward-identical, gradients kept) for the
  duration of their call.
- `prompt_attention_mass`: ssToken's semantic score of each response token.
- `flow_sequence_losses`, `flow_temperature`, `flow_example_weights`: FLOW's weights.
- `received_attention`, `otsu_three_class_thresholds`, `domain_centroid`, `xtf_keep_masks`: XTF's mask.
- `embedding_importance`, `sample_anchor`: TI-DPO's per-step token importance and its triplet anchor.
"""

from __future__ import annotations

import math

import torch

from alphatoken.hooks import claim, release
from alphatoken.blocks import decoder_blocks
from alphatoken.losses import IGNORE_INDEX


def _response_positions(feature: dict) -> torch.Tensor:
    """`(len-1,)` bool: loss position p is scored when `labels[p+1] != -100`."""
    return torch.tensor(feature["labels"][1:], dtype=torch.long) != IGNORE_INDEX


# ---------------------------------------------------------------------------------------------
# Attention probabilities of a forward


class AttentionCapture:
    """Records `reduce(A)` for the attention probabilities `A (B, H, T, T)` (detached; query, key) of
    the last `last_k` decoder blocks (None: every block), in block order, in `self.values`, for every
    forward while it is open (a context manager; `reset()` empties `values` before a forward).

    While open, the chosen blocks' attention modules switch the model's attention kernel to the
    project's eager attention (`alphatoken.valuation.attention.capturing_attention`: softmax(q k^T *
    scaling + mask) v with grouped-query heads, on the mask the model built; gradients flow as usual)
    for the duration of their call; other blocks keep the model's own kernel. The result is the
    model's forward up to the kernel's rounding (sdpa and eager compute the same function; for
    float64 models the softmax stays in float64, where Hugging Face's eager attention takes it in
    float32); dropout inside attention is not applied (the models here have attention_dropout = 0).
    Needs eager or sdpa attention (a 4-D mask or none). Keep it open across the backward when
    gradient checkpointing recomputes the blocks, so the recomputation runs the same kernel; what a
    recomputation records is appended after the forward's values.

        with AttentionCapture(model, last_k=1) as capture:
            capture.reset()
            logits = model(input_ids=ids, attention_mask=mask).logits
            attention = capture.values[0]      # (B, T, T) head-mean probabilities of the last block

    Naive equivalent: `model(..., output_attentions=True).attentions[-k:]` of an eager-attention copy
    of the model, each averaged over heads (tested)."""

    def __init__(self, model, last_k: int | None = 1, reduce=None):
        from alphatoken.valuation.signals import attention_module

        blocks = list(decoder_blocks(model))
        if last_k is not None and not 1 <= last_k <= len(blocks):
            raise ValueError(f"last_k={last_k} must be between 1 and the number of decoder blocks ({len(blocks)})")
        chosen = blocks if last_k is None else blocks[len(blocks) - last_k:]
        self.modules = [attention_module(block) for block in chosen]
        self.reduce = reduce if reduce is not None else (lambda probs: probs.mean(dim=1))  # (B, H, T, T) -> (B, T, T)
        self.values: list = []
        self._handles: list = []
        self._saved: dict = {}

    def _before(self, module, args, kwargs):
        from alphatoken.valuation.attention import ATTENTION_NAME

        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 4:
            raise ValueError(f"AttentionCapture needs eager or sdpa attention (a 4-D mask or none); the model runs "
                             f"{module.config._attn_implementation!r} with a {mask.dim()}-D mask")
        self._saved[id(module)] = module.config.__dict__.get("_attn_implementation_internal")
        module.config._attn_implementation_internal = ATTENTION_NAME

    def _after(self, module, args, output):
        module.config._attn_implementation_internal = self._saved.pop(id(module))
        self.values.append(self.reduce(output[1].detach()))  # output: (attn_output, probs (B, H, T, T))

    def reset(self) -> None:
        """Forget the recorded values (call before each forward whose values are wanted)."""
        self.values = []

    def __enter__(self):
        from alphatoken.valuation.attention import register_attention

        register_attention()
        self.values = []
        claim("ssToken's attention capture", self.modules)
        for module in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._before, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._after))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        release(self.modules)
        for module in self.modules:  # a forward that raised inside a chosen block
            if id(module) in self._saved:
                module.config._attn_implementation_internal = self._saved.pop(id(module))
        return False


def prompt_attention_mass(attention: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """ssToken's attention score at each loss position: `sum_{j < t0} A[b, p+1, j]`, the attention
    that the response token t = p+1, as a query, pays to the prompt, i.e. to the positions before the
    row's first response token t0 (ssToken `filter_tokens_with_attention_loss`:
    `attn[prompt_len:, :prompt_len].sum(-1)`, row = the token's own position).

    attention: `(B, T, T)` head-mean probabilities (query, key); valid: `(B, T-1)` bool. Returns
    `(B, T-1)`, 0 where not valid."""
    valid = valid.bool()
    B, width = valid.shape
    first = torch.where(valid.any(dim=1), valid.float().argmax(dim=1), torch.full((B,), width, device=valid.device))  # (B,) p0
    keys = torch.arange(attention.shape[-1], device=attention.device)  # (T,)
    prompt = keys[None, :] <= first[:, None]  # (B, T): key j is in the prompt when j < t0 = p0 + 1
    mass = (attention * prompt[:, None, :].to(attention.dtype)).sum(dim=-1)  # (B, T) per query position
    return mass[:, 1:] * valid  # (B, T-1): query p+1 at loss position p


# ---------------------------------------------------------------------------------------------
# FLOW (Sanyal et al., 2025): fixed per-example weights from the reference model


def flow_sequence_losses(features: list[dict], reference_losses: list) -> torch.Tensor:
    """`L_i` = mean reference NLL over example i's response positions, `(N,)` float64 (NaN for an
    example without response token; FLOW `get_dataset_temperature.py`, loss type "sequence")."""
    if len(features) != len(reference_losses):
        raise ValueError(f"{len(features)} features but {len(reference_losses)} rows of reference losses")
    out = torch.empty(len(features), dtype=torch.float64)
    for i, (feature, losses) in enumerate(zip(features, reference_losses)):
        response = _response_positions(feature)  # (len-1,)
        if losses.numel() != response.numel():
            raise ValueError(f"example {i}: {losses.numel()} reference losses for {response.numel()} loss positions")
        out[i] = losses.double()[response].sum() / response.sum()  # 0/0 = NaN without response
    return out


def flow_temperature(sequence_losses: torch.Tensor) -> float:
    """FLOW's temperature: the median of the per-example losses over the training set (`np.median`:
    the mean of the two middle values for an even count; examples without response left out)."""
    finite = sequence_losses[torch.isfinite(sequence_losses)]
    if finite.numel() == 0:
        raise ValueError("FLOW temperature: no example with a response token")
    tau = float(torch.quantile(finite.double(), 0.5))  # linear interpolation = np.median
    if not tau > 0:
        raise ValueError(f"FLOW temperature: the median sequence loss is {tau}, it must be > 0 (the reference model "
                         "predicts the training responses perfectly)")
    return tau


def flow_example_weights(features: list[dict], reference_losses: list, temperature: float | None = None) -> list:
    """FLOW sample weights `w_i = exp(-L_i / tau)` (not normalised; NaN -> 0 as FLOW's
    `create_weighted_dataset.py`), one `(len-1,)` row per example holding w_i on its response positions.
    `temperature` None: `flow_temperature` of these examples."""
    losses = flow_sequence_losses(features, reference_losses)  # (N,)
    tau = flow_temperature(losses) if temperature is None else float(temperature)
    weights = torch.nan_to_num(torch.exp(-losses / tau), nan=0.0)  # (N,)
    rows = []
    for feature, losses_i, w in zip(features, reference_losses, weights.tolist()):
        rows.append(_response_positions(feature).to(losses_i.dtype) * w)  # (len-1,)
    return rows


# ---------------------------------------------------------------------------------------------
# XTF (Yang et al., ICLR 2026): noise masks from the base model


def received_attention(probs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean attention token k receives from the later tokens of its sequence:
    `r[b, k] = mean_{q in (k, L_b)} mean_h A[b, h, q, k]`, L_b the row's length (right padding);
    NaN where no later token exists. probs `(B, H, T, T)`, attention_mask `(B, T)`; returns `(B, T)`."""
    mean = probs.double().mean(dim=1)  # (B, T, T) query, key
    real = attention_mask.bool()  # (B, T)
    T = real.shape[1]
    later = torch.ones(T, T, dtype=torch.bool, device=probs.device).tril(-1)  # [q, k]: q > k
    counted = later[None] & real[:, :, None] & real[:, None, :]  # (B, T, T) real query after real key
    total = (mean * counted).sum(dim=1)  # (B, T)
    count = counted.sum(dim=1)  # (B, T)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))


def otsu_three_class_thresholds(values: torch.Tensor, bins: int = 256) -> tuple[float, float] | None:
    """Multi-Otsu thresholds (t0, t1) splitting `values` into three classes, as
    `skimage.filters.threshold_multiotsu(values, classes=3, nbins=bins)` defines them: a histogram of
    `bins` equal bins over [min, max] (`np.histogram`), the bin pair (i < j) maximising the
    between-class variance `sum_c S_c^2 / P_c` (P_c the count, S_c the count-weighted sum of bin
    centres of class c; classes [0, i], (i, j], (j, bins-1]; a class with P_c = 0 adds 0; ties: the
    first pair in (i, j) order), returned as bin centres. A value x is then in class
    `(x >= t0) + (x >= t1)` (`np.digitize`). None when the values have fewer than 3 distinct numbers."""
    v = values.detach().double().reshape(-1)
    if torch.unique(v).numel() < 3:
        return None
    low, high = float(v.min()), float(v.max())
    index = ((v - low) * (bins / (high - low))).floor().long().clamp(0, bins - 1)  # (n,) np.histogram's bin
    hist = torch.bincount(index, minlength=bins).double()  # (bins,)
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    centres = (edges[:-1] + edges[1:]) / 2  # (bins,)
    P, S = hist.cumsum(0), (hist * centres).cumsum(0)  # (bins,) cumulative count and sum up to bin i

    def term(p, s):
        return torch.where(p > 0, s * s / p.clamp(min=1e-300), torch.zeros_like(s))

    i = torch.arange(bins)[:, None]  # (bins, 1)
    j = torch.arange(bins)[None, :]  # (1, bins)
    objective = term(P[i], S[i]) + term(P[j] - P[i], S[j] - S[i]) + term(P[-1] - P[j], S[-1] - S[j])  # (bins, bins)
    allowed = (i < j) & (j < bins - 1)
    best = int(torch.argmax(torch.where(allowed, objective, torch.full_like(objective, -math.inf))))  # first maximum
    return float(centres[best // bins]), float(centres[best % bins])


def domain_centroid(embeddings: torch.Tensor, tokenizer, words) -> torch.Tensor:
    """Mean over `words` of each word's mean input embedding (its tokens without special tokens):
    the "domain" point of XTF's task relevance. embeddings `(V, d)`; returns `(d,)` float64."""
    vectors = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"XTF domain word {word!r} has no token")
        vectors.append(embeddings[torch.tensor(ids, device=embeddings.device)].double().mean(dim=0))  # (d,)
    if not vectors:
        raise ValueError("XTF needs at least one domain word")
    return torch.stack(vectors).mean(dim=0)  # (d,)


def embedding_distance(vectors: torch.Tensor, centre: torch.Tensor, metric: str) -> torch.Tensor:
    """`(n, d), (d,) -> (n,)` float64: cosine distance `1 - cos` or Euclidean distance to `centre`."""
    vectors, centre = vectors.double(), centre.double().to(vectors.device)
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(vectors, centre[None, :], dim=-1)
    if metric == "euclidean":
        return (vectors - centre[None, :]).norm(dim=-1)
    raise ValueError(f"unknown XTF distance {metric!r}: use 'cosine' or 'euclidean'")


@torch.no_grad()
def xtf_keep_masks(model, tokenizer, features: list[dict], reference_losses: list, pad_id: int, device,
                   micro_batch_size: int, attention_layers: int | None, iqr_factor: float, novelty_threshold: float,
                   distance: str, domain_words) -> list:
    """XTF's per-example keep masks, `(len-1,)` float rows (1 kept, 0 noise or off the response),
    from the base `model` (eval mode, one forward per `micro_batch_size` examples). A response token
    (loss position p, token t = p+1) is noise when any of:
    - reasoning importance: `received_attention` of token t, averaged over the heads of the last
      `attention_layers` blocks (None: all), is below `Q1 - iqr_factor (Q3 - Q1)`, quartiles
      (`torch.quantile`, linear) over the example's response tokens that have a later token (the
      others are not judged by this attribute);
    - knowledge novelty: the base model's probability `exp(-l_ref[p]) > novelty_threshold`;
    - task relevance: `r = 1 - (d - d_min) / (d_max - d_min)`, d the `distance` of token t's input
      embedding to `domain_centroid(domain_words)`, min and max over all response tokens of the
      training set, falls in the second-lowest of three Multi-Otsu classes of r over those tokens
      (`otsu_three_class_thresholds`; none is noise when r takes fewer than 3 values)."""
    from alphatoken.data import collate

    if len(features) != len(reference_losses):
        raise ValueError(f"{len(features)} features but {len(reference_losses)} rows of reference losses")
    was_training = model.training
    model.eval()
    embeddings = model.get_input_embeddings().weight.detach()  # (V, d)
    centre = domain_centroid(embeddings, tokenizer, domain_words)  # (d,)
    received, distances = [], []  # per example (len-1,): reasoning importance, embedding distance of token p+1
    for start in range(0, len(features), micro_batch_size):
        chunk = features[start:start + micro_batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        mask = batch["attention_mask"]  # (B, T)
        with AttentionCapture(model, attention_layers, reduce=lambda probs: received_attention(probs, mask)) as capture:
            model(input_ids=batch["input_ids"], attention_mask=mask)
        importance = torch.stack(capture.values).mean(dim=0).cpu()  # (B, T) mean over the chosen blocks
        for row, feature in enumerate(chunk):
            n = len(feature["input_ids"])
            received.append(importance[row, 1:n])  # (n-1,) token p+1 at loss position p
            ids = batch["input_ids"][row, 1:n]  # (n-1,)
            distances.append(embedding_distance(embeddings[ids], centre, distance).cpu())  # (n-1,)
    model.train(was_training)

    responses = [_response_positions(f) for f in features]
    all_distances = torch.cat([d[r] for d, r in zip(distances, responses)])  # every response token of the set
    d_low, d_high = float(all_distances.min()), float(all_distances.max())
    span = d_high - d_low

    def relevance(d):
        return torch.ones_like(d) if span <= 0 else 1.0 - (d - d_low) / span

    thresholds = otsu_three_class_thresholds(relevance(all_distances))
    masks = []
    for response, importance, d, losses in zip(responses, received, distances, reference_losses):
        judged = response & torch.isfinite(importance)  # (len-1,)
        low = torch.zeros_like(response)
        if judged.any():
            q1, q3 = torch.quantile(importance[judged], torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
            low = judged & (importance < q1 - iqr_factor * (q3 - q1))
        known = torch.exp(-losses.double()) > novelty_threshold
        irrelevant = torch.zeros_like(response)
        if thresholds is not None:
            r = relevance(d)
            irrelevant = (r >= thresholds[0]) & (r < thresholds[1])  # class 1 of 0, 1, 2
        noise = low | known | irrelevant
        masks.append((response & ~noise).to(losses.dtype))  # (len-1,)
    return masks


# ---------------------------------------------------------------------------------------------
# TI-DPO: gradient attribution of the tokens and the sampled anchor response


def embedding_importance(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """TI-DPO's token importance (gracefulning/TIDPO gradient_attribution.py
    `compute_language_model_gradient_attribution_from_ids`): for each row, the target is the largest
    logit at the row's last attended position, `max_v z[b, last_b, v]`, and the importance of position
    t is the L1 norm over the hidden dimension of `d target / d e[b, t]`, e the input embeddings; eval
    mode (as the source), one forward and one backward for the batch (rows do not interact), without
    touching the parameters' gradients. input_ids, attention_mask `(B, T)` -> label-aligned `(B, T)`
    float, detached, 0 on padding. Naive equivalent: per row, per position, perturb e[b, t] along each
    hidden unit and difference the target (tested)."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)  # (B, T, d)
            logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits  # (B, T, V)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # (B, T)
            last = positions.masked_fill(~attention_mask.bool(), -1).amax(dim=1)  # (B,) last attended position
            target = logits[torch.arange(input_ids.shape[0], device=input_ids.device), last].amax(dim=-1)  # (B,)
            (grad,) = torch.autograd.grad(target.sum(), embeds)  # (B, T, d)
    finally:
        model.train(was_training)
    return grad.detach().abs().sum(dim=-1) * attention_mask.to(grad.dtype)  # (B, T)


@torch.no_grad()
def sample_anchor(model, prompt: list[int], max_new_tokens: int, generator: torch.Generator, temperature: float,
                  top_k: int, top_p: float, stop_ids: list[int]) -> list[int]:
    """TI-DPO's anchor: one response sampled from `model` (the current policy) for `prompt`, as the
    source's `model.generate(do_sample=True, top_k, top_p, temperature)` draws it: the next-token
    logits restricted to the `top_k` largest (0: all), `softmax(logits / temperature)` cut to the
    `top_p` nucleus (`alphatoken.fisher.sampling_log_probs`), one Gumbel-max draw per token from
    `generator` (CPU, so the draw is the same on every device and a resumed run repeats it), until a
    token of `stop_ids` (kept) or `max_new_tokens`. Eval mode, key/value cache. Returns the sampled
    token ids (without the prompt)."""
    from alphatoken.fisher import gumbel_noise, sampling_log_probs

    was_training = model.training
    model.eval()
    device = model.get_input_embeddings().weight.device
    sampled: list[int] = []
    try:
        ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, P)
        past = None
        for _ in range(max_new_tokens):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1].float().cpu()  # (1, V)
            if not torch.isfinite(logits).any() or torch.isnan(logits).any():
                raise FloatingPointError(f"non-finite next-token logits while sampling the TI-DPO anchor (after {len(sampled)} tokens)")
            if 0 < top_k < logits.shape[-1]:
                cut = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (1, 1) the k-th largest logit
                logits = logits.masked_fill(logits < cut, float("-inf"))
            logq = sampling_log_probs(logits, temperature, top_p)  # (1, V)
            token = int(torch.argmax(logq[0] + gumbel_noise(logq.shape[-1], generator, "cpu")))
            sampled.append(token)
            if token in stop_ids:
                break
            ids = torch.tensor([[token]], dtype=torch.long, device=device)  # (1, 1) the cache holds the rest
    finally:
        model.train(was_training)
    return sampled

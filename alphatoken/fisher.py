"""Monte-Carlo Fisher of the scored weights at the reference model (paper Sec. 3.3): diagonal (the
default), or Kronecker-factored (`FisherConfig.kind = "kronecker"`, paper Table 6), see below.

For every scored weight W (the `nn.Linear` weights of the last K decoder blocks, or the LoRA factors
`lora_A`, `lora_B` there for a peft-wrapped model, see `alphatoken.blocks.scored_linears`):

    F_W = (1/N) sum_n ( grad_W log p_ref(y~_n | x_n) )^2          (elementwise square)

with `x_n` the N Fisher hold-out prompts, `y~_n ~ p_ref(. | x_n)` a response sampled from the reference
model itself (`labels="sampled"`, the Monte-Carlo Fisher) or the dataset response (`labels="empirical"`,
the empirical Fisher, for comparison), and `log p` summed over the response tokens. One squared
*per-sample* gradient per prompt: squaring the gradient of a whole batch would add the cross terms
`2 g_n g_m`, which do not vanish and make the result depend on the batch size.

Naive equivalent (what the tests compare against, one prompt at a time):

    for n, (x, y) in enumerate(zip(prompts, responses)):
        logp = log_softmax(model(x + y).logits)[positions of y, tokens of y].sum()
        grads = torch.autograd.grad(logp, [lin.weight for lin in scored_linears(model, K).values()])
        F += [g ** 2 for g in grads]
    F /= N

Fast path: several prompts per forward/backward. A scored linear computes `z_t = W x_t (+ b)`, so the
gradient of sample n's log-likelihood is `sum_t e_{n,t} (x) x_{n,t}` with `e_{n,t} = d log p_n / d z_{n,t}`.
Forward hooks capture `x` and `z` of every scored linear, one backward of `sum_n log p_n` gives all `e`
(samples do not interact), and `einsum('bto,bti->boi', e, x)` rebuilds the per-sample gradients, which
are squared and accumulated. The backward starts at the input of the first scored block, so the
earlier blocks are never differentiated.

Kronecker-factored Fisher (`kind="kronecker"`, K-FAC). From the same samples, log-likelihoods and
hooks (so the same `x` and `e`), per scored weight W (d_out, d_in):

    A_W = (1/M) sum_n sum_{t in T_n} x_{n,t} x_{n,t}^T        (d_in, d_in)    a per-token mean
    S_W = (1/N) sum_n sum_{t in T_n} e_{n,t} e_{n,t}^T        (d_out, d_out)  a per-sample mean of token sums

with T_n the positions 0 .. L_n - 2 of sample n's prompt + response (L_n tokens; every position but
the last, whose output reaches no predicted token, so e = 0 there in every block; padding never
counts) and M = sum_n (L_n - 1) the number of such tokens. `S_W (x) A_W` approximates the Fisher
matrix of vec(W): dropping the cross-token terms of `g_n g_n^T` leaves
`(1/N) sum_{n,t} (e e^T) (x) (x x^T) = (M/N) E_t[(e e^T) (x) (x x^T)]` (E_t the mean over those M
tokens), and K-FAC replaces the mean of the Kronecker products by the Kronecker product of the means,
`(M/N) E_t[e e^T] (x) E_t[x x^T] = S_W (x) A_W` (Martens & Grosse 2015, with the tokens of a sequence
as uses of a shared weight: the "expand" setting of Eschenhagen et al. 2023, arXiv:2311.00636; a
linear called twice per forward counts each call's tokens). Its scale is that of
F_W, so lambda means the same for both kinds. For one sample of one counted position (N = M = 1) the
two agree exactly: `diag(S (x) A)[o, i] = e_o^2 x_i^2 = F_W[o, i]`; in general the diagonal of
`S (x) A` is *not* F_W (no cross-token terms, and the factorisation). The retention proxy becomes
`P_W = S_W (W - W_ref) A_W`, which is `(S (x) A) vec(W - W_ref)` for the row-major vec (A, S
symmetric) and the gradient of `R(W) = 1/2 tr((W - W_ref)^T S (W - W_ref) A)`. In memory and on disk
the factors of the parameter `name` are the tensors `name + ".kfac_A"` and `name + ".kfac_S"`
(`KRONECKER_SUFFIXES`); the diagonal Fisher is the tensor `name` itself.

LoRA factors (paper App. B.2.3): a factor is a linear like any other (`lora_A` sees x, `lora_B` sees
A x, and its output error already carries the scaling s), so the same hooks give F_A (r, d_in) and
F_B (d_out, r) (Kronecker: A and S factors of each); the cache is small. With peft's default
initialisation B = 0, the gradient reaching A, s B^T e x^T, is zero: at such a reference F_A = 0
exactly (Kronecker: S_A = 0), and the proxy P_A stays 0 for the whole run, while P_B carries the
retention term.

Sampling uses `model.generate` (left padding, KV cache, stops at eos) with a logits processor that
draws `argmax(log q + Gumbel noise)` from a private `torch.Generator` per prompt, seeded from
`(seed, prompt index)`; `q` is the temperature / top-p sampling distribution of the reference model.
The Gumbel-max draw is an exact sample of `q`, and the sample of prompt n never depends on the batch
size or on the other prompts of its batch (up to float rounding differences of padded batches, which
only matter at exact ties).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import LogitsProcessor

from alphatoken.hooks import claim, release
from alphatoken import __version__
from alphatoken.blocks import scored_blocks, scored_linears
from alphatoken.data import IGNORE_INDEX, ExampleDropped, check_choice, check_int, check_number, encode_chat
from alphatoken.models import weights_fingerprint
from alphatoken.tensorfile import deterministic_safetensors, read_safetensors_metadata

log = logging.getLogger(__name__)

LABEL_MODES = ("sampled", "empirical")
FISHER_KINDS = ("diagonal", "kronecker")
# Tensor-name suffixes of the Kronecker factors of a parameter: A = E[x x^T] (d_in, d_in), S = E[e e^T] (d_out, d_out).
KRONECKER_SUFFIXES = (".kfac_A", ".kfac_S")
FORMAT = "alphatoken.fisher/1"  # metadata tag of a Fisher file; bump when its layout changes
# Config fields that change the Fisher values, checked by `load_fisher` (batch_size does not).
RESULT_FIELDS = ("last_k", "kind", "labels", "temperature", "top_p", "max_new_tokens", "seed")
# The value of a config field in files written before the field existed (all of them were diagonal).
LEGACY_FIELDS = {"kind": "diagonal"}


class FisherMismatchError(ValueError):
    """A cached Fisher does not belong to the given model or configuration."""


@dataclass(frozen=True)
class FisherConfig:
    """How the Monte-Carlo Fisher is computed."""

    last_k: int = 3  # scored weights: every nn.Linear (LoRA: every adapter factor) in the last K decoder blocks (paper K=3)
    kind: str = "diagonal"  # "diagonal": F_W, one value per weight entry; "kronecker": the K-FAC factors A_W, S_W
    labels: str = "sampled"  # "sampled": y~ ~ p_ref (Monte-Carlo Fisher); "empirical": dataset responses
    temperature: float = 1.0  # sampling temperature (1.0 = the reference model's own distribution)
    top_p: float = 1.0  # nucleus sampling mass (1.0 = no truncation, the exact Fisher)
    max_new_tokens: int = 64  # longest sampled response; sampling also stops at eos
    seed: int = 0  # base seed; prompt n samples from a generator seeded by (seed, n)
    batch_size: int = 4  # prompts per generate call and per backward; does not change the result

    def __post_init__(self):
        owner = "FisherConfig"
        for name in ("last_k", "max_new_tokens", "batch_size"):
            check_int(owner, name, getattr(self, name), 1)
        check_int(owner, "seed", self.seed, 0)
        check_choice(owner, "kind", self.kind, FISHER_KINDS)
        check_choice(owner, "labels", self.labels, LABEL_MODES)
        check_number(owner, "temperature", self.temperature, 0.0, low_open=True)
        check_number(owner, "top_p", self.top_p, 0.0, 1.0, low_open=True)


@dataclass(frozen=True)
class FisherPrompts:
    """A Fisher hold-out handed to a training run, which computes the Fisher of its scored parameters
    at step 0 (needed for LoRA factors: they exist only once the run has initialised the adapters)."""

    prompts: list  # token ids of the chat prompts, rendered with the generation prompt
    config: FisherConfig  # how the Fisher is computed
    responses: list | None = None  # the dataset responses (token ids), for config.labels == "empirical"

    def __post_init__(self):
        if not isinstance(self.config, FisherConfig):
            raise TypeError(f"FisherPrompts.config: expected a FisherConfig, got {type(self.config).__name__}")
        if not isinstance(self.prompts, (list, tuple)) or not self.prompts:
            raise ValueError("FisherPrompts.prompts: need a non-empty list of token-id lists")


# ----------------------------------------------------------------------------------------------------
# The tensors of a Fisher of either kind


def fisher_tensor_shapes(linears: dict[str, nn.Linear], kind: str) -> dict[str, tuple[int, ...]]:
    """The tensors a Fisher of `kind` holds for the scored `linears` ({parameter name: linear}), in
    their order: "diagonal", F shaped like the weight under the parameter's name; "kronecker", A
    (d_in, d_in) and S (d_out, d_out) under the name + `KRONECKER_SUFFIXES`."""
    check_choice("fisher", "kind", kind, FISHER_KINDS)
    shapes = {}
    for name, linear in linears.items():
        d_out, d_in = linear.weight.shape
        if kind == "diagonal":
            shapes[name] = (d_out, d_in)
        else:
            shapes[name + KRONECKER_SUFFIXES[0]] = (d_in, d_in)
            shapes[name + KRONECKER_SUFFIXES[1]] = (d_out, d_out)
    return shapes


def fisher_kind(tensors: dict) -> str:
    """The kind of an in-memory Fisher ({tensor name: tensor}, as `compute_fisher` and `load_fisher`
    return it): "kronecker" when its names carry the factor suffixes, else "diagonal". ValueError for
    a dict holding both kinds of names."""
    factors = [name for name in tensors if name.endswith(KRONECKER_SUFFIXES)]
    if factors and len(factors) < len(tensors):
        other = next(name for name in tensors if not name.endswith(KRONECKER_SUFFIXES))
        raise ValueError(f"fisher mixes Kronecker factors ({factors[0]!r}, ...) with diagonal entries ({other!r}, ...): "
                         "a Fisher is of one kind")
    return "kronecker" if factors else "diagonal"


def fisher_parameter_names(tensors: dict) -> list[str]:
    """The parameters an in-memory Fisher covers: its names (diagonal), or the names of the parameters
    that have both Kronecker factors (kronecker)."""
    if fisher_kind(tensors) == "diagonal":
        return list(tensors)
    input_suffix, output_suffix = KRONECKER_SUFFIXES
    return [name.removesuffix(input_suffix) for name in tensors
            if name.endswith(input_suffix) and name.removesuffix(input_suffix) + output_suffix in tensors]


def fisher_entries(tensors: dict, linears: dict[str, nn.Linear], what: str = "fisher") -> tuple[str, dict]:
    """The kind of the in-memory Fisher `tensors` and its entry for each of the scored `linears`:
    "diagonal", {name: F (d_out, d_in)}; "kronecker", {name: (A (d_in, d_in), S (d_out, d_out))}.
    Tensors of other parameters (a Fisher of more blocks) are ignored. KeyError naming the first
    scored weight without its tensor, ValueError for a misshapen tensor or a mix of the two kinds."""
    kind = fisher_kind(tensors)
    expected = fisher_tensor_shapes(linears, kind)
    for key, shape in expected.items():
        name = key.removesuffix(KRONECKER_SUFFIXES[0]).removesuffix(KRONECKER_SUFFIXES[1])
        weight_shape = tuple(linears[name].weight.shape)
        if key not in tensors:
            if kind == "diagonal":
                raise KeyError(f"{what} has no entry for the scored weight {name!r}")
            raise KeyError(f"{what} (Kronecker factors) has no entry {key!r} for the scored weight {name!r}")
        if tuple(tensors[key].shape) != shape:
            if kind == "diagonal":
                raise ValueError(f"{what}[{key!r}] has shape {tuple(tensors[key].shape)}, the weight has {weight_shape}")
            factor = "A (d_in, d_in)" if key.endswith(KRONECKER_SUFFIXES[0]) else "S (d_out, d_out)"
            raise ValueError(f"{what}[{key!r}] has shape {tuple(tensors[key].shape)}: the Kronecker factor {factor} "
                             f"of the weight {name!r} {weight_shape} is {shape}")
    if kind == "diagonal":
        return kind, {name: tensors[name] for name in linears}
    return kind, {name: (tensors[name + KRONECKER_SUFFIXES[0]], tensors[name + KRONECKER_SUFFIXES[1]]) for name in linears}


# ----------------------------------------------------------------------------------------------------
# Sampling


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt `index`'s private generator: 63 bits of SHA-256("alphatoken.fisher:seed:index").
    Depends only on the base seed and the prompt's position in the Fisher prompt list."""
    digest = hashlib.sha256(f"alphatoken.fisher:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sampling_log_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log q: the distribution sampled from, `softmax(logits / temperature)` restricted to the nucleus
    (the most probable tokens whose mass reaches `top_p`; a token is dropped when the tokens at most as
    probable as it, itself included, hold mass <= 1 - top_p, as in Hugging Face's top-p), renormalised.
    Dropped tokens get -inf. logits: (B, V) -> (B, V) float32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_logp, order = torch.sort(logp, dim=-1, descending=False)  # (B, V) ascending
        tail_mass = sorted_logp.exp().cumsum(dim=-1)  # (B, V) mass of this token and all less probable
        drop_sorted = tail_mass <= 1 - top_p
        drop_sorted[:, -1] = False  # always keep the most probable token
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # (B, V) back to vocabulary order
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def gumbel_noise(vocab_size: int, generator: torch.Generator, device) -> torch.Tensor:
    """One step of standard Gumbel noise `-log(-log U)`, U ~ Uniform[0, 1) from `generator`: (V,) float32.
    `argmax(log q + noise)` is an exact sample from q (Gumbel-max)."""
    u = torch.rand(vocab_size, generator=generator, device=device, dtype=torch.float32)  # (V,)
    return -torch.log(-torch.log(u))


class _NonFiniteLogits(FloatingPointError):
    """NaN (or no finite) logits in some rows of a generate step; `rows` are batch rows."""

    def __init__(self, rows: list[int]):
        super().__init__(f"non-finite logits in batch rows {rows}")
        self.rows = rows


class _SeededSampler(LogitsProcessor):
    """Replaces the scores of a greedy `generate` by `log q + Gumbel noise`, the noise of row b drawn
    from row b's own generator; greedy decoding then takes an exact sample of q per row."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        bad = ~torch.isfinite(scores).any(dim=-1) | torch.isnan(scores).any(dim=-1)  # (B,)
        if bad.any():
            raise _NonFiniteLogits(bad.nonzero().flatten().tolist())
        logq = sampling_log_probs(scores, self.temperature, self.top_p)  # (B, V)
        noise = torch.stack([gumbel_noise(scores.shape[-1], g, scores.device) for g in self.generators])  # (B, V)
        return logq + noise


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Tokens that end a sampled response: the tokenizer's eos and the model's generation-config eos
    (chat models often list several, e.g. end-of-turn and end-of-text)."""
    ids = []
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        eos = generation_config.eos_token_id
        candidates += list(eos) if isinstance(eos, (list, tuple)) else [eos]
    for token in candidates:
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    return ids


def _device_of(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _generating_model(model: nn.Module) -> nn.Module:
    """The transformers model whose `generate` and `generation_config` sampling uses: a peft wrapper's
    underlying model (its LoRA layers are injected in place, so the adapters take part)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _sample_batch(model, prompts: list[list[int]], indices: list[int], cfg: FisherConfig,
                  stop_ids: list[int], pad_id: int) -> list[list[int]]:
    """Sample one response per prompt with `model.generate` (left padding). Each response ends with its
    first stop token, or has `max_new_tokens` tokens.

    Some attention kernels turn the fully masked rows of left padding into NaN that then leaks into the
    real tokens (eager attention of a float64 model: its float32 softmax sees the float64 mask minimum
    as -inf). A batch hit by that is sampled again one prompt at a time, without padding; the samples
    are the same, since each prompt has its own generator. NaN without padding is an error."""
    try:
        return _generate(model, prompts, indices, cfg, stop_ids, pad_id)
    except _NonFiniteLogits as error:
        if len({len(p) for p in prompts}) == 1:
            raise FloatingPointError(
                f"NaN/non-finite logits while sampling Fisher prompts {[indices[r] for r in error.rows]} "
                "(no padding involved): the model itself produces them"
            ) from None
        log.warning("non-finite logits with left padding (attention kernel %s, dtype %s): sampling prompts "
                    "%d..%d one at a time", getattr(model.config, "_attn_implementation", "?"),
                    model.get_input_embeddings().weight.dtype, indices[0], indices[-1])
    responses = []
    for prompt, index in zip(prompts, indices):
        try:
            responses += _generate(model, [prompt], [index], cfg, stop_ids, pad_id)
        except _NonFiniteLogits:
            raise FloatingPointError(f"NaN/non-finite logits while sampling Fisher prompt {index}: "
                                     "the model itself produces them") from None
    return responses


def _generate(model, prompts: list[list[int]], indices: list[int], cfg: FisherConfig,
              stop_ids: list[int], pad_id: int) -> list[list[int]]:
    from transformers import GenerationConfig, LogitsProcessorList

    model = _generating_model(model)
    device = _device_of(model)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, P) left padded
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    generators = []
    for index in indices:
        generator = torch.Generator(device=device)
        generator.manual_seed(prompt_seed(cfg.seed, index))
        generators.append(generator)
    # Greedy decoding over `log q + noise` with nothing else in the processor chain: a fresh
    # GenerationConfig, and the model's own one swapped out for the call so that none of its settings
    # (repetition penalty, suppressed tokens, minimum length, ...) fill in and bias the samples.
    generation_config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=cfg.max_new_tokens,
        eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True,
    )
    own_config = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        sequences = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([_SeededSampler(generators, cfg.temperature, cfg.top_p)]),
        )  # (B, P + S)
    finally:
        model.generation_config = own_config
    responses = []
    for row in sequences[:, width:].tolist():  # new tokens, pad after a row's stop token
        cut = next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row))
        responses.append(row[:cut])
    return responses


# ----------------------------------------------------------------------------------------------------
# Per-sample squared gradients


class _LinearCapture:
    """Forward hooks keeping the input `x` and output `z` of each scored linear, and a pre-hook making
    the input of the first scored block a fresh leaf so the backward stops there. They act only while
    `active` (not while sampling). `remove()` undoes all."""

    def __init__(self, first_block: nn.Module, linears: dict[str, nn.Linear]):
        self.records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in linears}
        self.active = False
        self.claimed = claim("the Fisher's capture", [first_block, *linears.values()])
        self.handles = [first_block.register_forward_pre_hook(self._cut, with_kwargs=True)]
        for name, linear in linears.items():
            self.handles.append(linear.register_forward_hook(self._keeper(name)))

    def _cut(self, module, args, kwargs):
        if not self.active:
            return None
        # The errors e at the scored linears depend only on what comes after them, so differentiating
        # from a detached copy of the block input gives the same e without touching earlier blocks.
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}

    def _keeper(self, name: str):
        def hook(module, args, output):
            if self.active:
                self.records[name].append((args[0].detach(), output))  # x (B, T, in), z (B, T, out)
        return hook

    def clear(self):
        for calls in self.records.values():
            calls.clear()

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        release(self.claimed)


def _right_padded(sequences: list[list[int]], response_lengths: list[int], pad_id: int, device):
    """input_ids, real-token mask and response-token mask of `prompt + response` rows, right padded.
    All (B, T).

    Real tokens keep positions 0..L-1 and, attention being causal, never see the padding after them:
    their logits are those of the unpadded row with no attention mask at all. Passing none also keeps
    every attention row non-empty (a padding query still sees the tokens before it), where a padding
    mask can leave rows fully masked, which some kernels turn into NaN that leaks through `0 * NaN`."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, T)
    real_mask = torch.zeros((len(sequences), width), dtype=torch.bool)  # (B, T) True on prompt + response
    response_mask = torch.zeros((len(sequences), width), dtype=torch.bool)  # (B, T) True on y~ tokens
    for row, (sequence, n_response) in enumerate(zip(sequences, response_lengths)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        real_mask[row, : len(sequence)] = True
        response_mask[row, len(sequence) - n_response: len(sequence)] = True
    return input_ids.to(device), real_mask.to(device), response_mask.to(device)


# The per-sample gradients of one scored linear are formed for at most this many elements at a time
# (samples x out x in): 2^26 float32 elements are 256 MiB, where all B of a 9B model's largest linear
# at once would be B x 4096 x 12288 (about 0.2 GB per sample).
PER_SAMPLE_ELEMENTS = 2**26


class _DiagonalSums:
    """sum_n (grad_W log p_n)^2 of every scored weight, batch by batch; `result` divides by N."""

    def __init__(self, linears: dict[str, nn.Linear], dtype: torch.dtype):
        self.dtype = dtype
        self.sums = {name: torch.zeros(l.weight.shape, dtype=dtype, device=l.weight.device) for name, l in linears.items()}

    def add(self, names: list[str], inputs: list, errors: list, real_mask: torch.Tensor) -> None:
        """One batch: x (B, T, in) and e (B, T, out) of every call of a scored linear (e None: the call
        does not influence the response tokens), real_mask (B, T) True on prompt + response tokens.
        One linear at a time, its per-sample gradients (b, out, in) for a chunk of b samples at a time
        (`PER_SAMPLE_ELEMENTS`): the calls of a linear called twice are summed per sample first."""
        calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for name, x, e in zip(names, inputs, errors):
            if e is not None:  # None: this call does not influence the response tokens
                calls.setdefault(name, []).append((x, e))
        keep = real_mask[:, :, None]  # (B, T, 1) padding never contributes
        n = real_mask.shape[0]
        for name, pairs in calls.items():
            out_features, in_features = self.sums[name].shape
            chunk = max(1, PER_SAMPLE_ELEMENTS // (out_features * in_features))
            for start in range(0, n, chunk):
                rows = slice(start, min(start + chunk, n))
                g = None
                for x, e in pairs:
                    x_rows = torch.where(keep[rows], x[rows].to(self.dtype), 0.0)  # (b, T, in)
                    term = torch.einsum("bto,bti->boi", e[rows].to(self.dtype), x_rows)  # (b, out, in)
                    g = term if g is None else g + term
                self.sums[name] += g.square().sum(dim=0).to(self.sums[name].device)  # (out, in)

    def result(self, n_samples: int) -> dict[str, torch.Tensor]:
        return {name: (f / n_samples).cpu() for name, f in self.sums.items()}


class _KroneckerSums:
    """sum over counted tokens of x x^T (and their count M) and of e e^T per scored linear, batch by
    batch; `result` gives A = (sum x x^T) / M and S = (sum e e^T) / N (module docstring)."""

    def __init__(self, linears: dict[str, nn.Linear], dtype: torch.dtype):
        self.dtype = dtype
        self.inputs = {name: torch.zeros(l.in_features, l.in_features, dtype=dtype, device=l.weight.device)
                       for name, l in linears.items()}  # (in, in)
        self.errors = {name: torch.zeros(l.out_features, l.out_features, dtype=dtype, device=l.weight.device)
                       for name, l in linears.items()}  # (out, out)
        self.tokens = {name: 0 for name in linears}

    def add(self, names: list[str], inputs: list, errors: list, real_mask: torch.Tensor) -> None:
        """As `_DiagonalSums.add`. The counted tokens are every real position but a row's last one:
        position t counts when t + 1 is a real token (rows are right padded)."""
        counted = torch.zeros_like(real_mask)  # (B, T)
        counted[:, :-1] = real_mask[:, 1:]
        rows = counted.flatten()  # (B*T,) selecting, not multiplying: padding activations never enter
        n_rows = int(rows.sum())
        for name, x, e in zip(names, inputs, errors):
            x = x.to(self.dtype).flatten(0, 1)[rows]  # (n, in)
            self.inputs[name] += (x.T @ x).to(self.inputs[name].device)
            self.tokens[name] += n_rows  # a linear called twice counts each call's tokens
            if e is not None:  # None: the call does not influence the response tokens, e = 0
                e = e.to(self.dtype).flatten(0, 1)[rows]  # (n, out)
                self.errors[name] += (e.T @ e).to(self.errors[name].device)

    def result(self, n_samples: int) -> dict[str, torch.Tensor]:
        input_suffix, output_suffix = KRONECKER_SUFFIXES
        factors = {}
        for name in self.inputs:
            if self.tokens[name] == 0:
                raise RuntimeError(f"Kronecker Fisher: the scored linear {name} saw no token")
            factors[name + input_suffix] = (self.inputs[name] / self.tokens[name]).cpu()
            factors[name + output_suffix] = (self.errors[name] / n_samples).cpu()
        return factors


def _accumulate_batch(model, capture: _LinearCapture, prompts, responses, pad_id: int,
                      sums: _DiagonalSums | _KroneckerSums) -> None:
    """Add one batch's per-sample squared gradients (diagonal) or factor sums (kronecker) to `sums`."""
    device = _device_of(model)
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    input_ids, real_mask, response_mask = _right_padded(sequences, [len(r) for r in responses], pad_id, device)
    acc_dtype = sums.dtype
    capture.clear()
    capture.active = True
    # No parameter needs a gradient (only the errors at the scored linears' outputs are asked for), so
    # with requires_grad off the blocks before the cut build no graph and keep no activations, and the
    # scored linears keep no input for a weight gradient; restored below.
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grad_flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V) causal mask only
            # position p predicts token p+1; only response tokens count (where, not *: 0 * NaN = NaN)
            logp = torch.log_softmax(logits[:, :-1].to(acc_dtype), dim=-1)  # (B, T-1, V)
            token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
            objective = torch.where(response_mask[:, 1:], token_logp, 0.0).sum()  # sum_n log p(y_n | x_n)
            names = [name for name, calls in capture.records.items() for _ in calls]
            outputs = [z for calls in capture.records.values() for _, z in calls]
            errors = torch.autograd.grad(objective, outputs, allow_unused=True)  # each (B, T, out)
        inputs = [x for calls in capture.records.values() for x, _ in calls]
        sums.add(names, inputs, list(errors), real_mask)
    finally:
        capture.active = False
        capture.clear()
        for p, flag in grad_flags:
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------------
# Public API


def _check_token_lists(kind: str, lists, vocab_size: int, count: int | None = None) -> list[list[int]]:
    if not isinstance(lists, (list, tuple)):
        raise ValueError(f"{kind}: expected a list of token-id lists, got {type(lists).__name__}")
    if count is not None and len(lists) != count:
        raise ValueError(f"{kind}: expected {count} entries (one per prompt), got {len(lists)}")
    checked = []
    for i, ids in enumerate(lists):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) or len(ids) == 0:
            raise ValueError(f"{kind}[{i}]: expected a non-empty list of token ids, got {ids!r:.80}")
        for j, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
                raise ValueError(f"{kind}[{i}][{j}]: token id {token!r} is not an integer in [0, {vocab_size})")
        checked.append(list(ids))
    return checked


def _pad_token_id(tokenizer, stop_ids: list[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    if stop_ids:
        return stop_ids[0]
    return 0


def sample_responses(model: nn.Module, tokenizer, prompts: list[list[int]], cfg: FisherConfig,
                     progress: bool = False) -> list[list[int]]:
    """The responses `compute_fisher` samples for `prompts` (labels="sampled"): response n is drawn
    from `q(. | x_n)` with the generator of `prompt_seed(cfg.seed, n)`, ends with its first stop token
    or after `cfg.max_new_tokens` tokens. Leaves the model as found."""
    vocab_size = model.get_input_embeddings().num_embeddings
    prompts = _check_token_lists("prompts", prompts, vocab_size)
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = _pad_token_id(tokenizer, stop_ids)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    responses = []
    try:
        for start in tqdm(range(0, len(prompts), cfg.batch_size), desc="fisher samples", disable=not progress):
            indices = list(range(start, min(start + cfg.batch_size, len(prompts))))
            responses += _sample_batch(model, [prompts[i] for i in indices], indices, cfg, stop_ids, pad_id)
    finally:
        for module, training in modes.items():
            module.training = training
    return responses


def compute_fisher(model: nn.Module, tokenizer, prompts: list[list[int]], cfg: FisherConfig,
                   responses: list[list[int]] | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Monte-Carlo Fisher of every scored weight: `cfg.kind == "diagonal"`, `F_W = mean_n (grad_W log
    p(y~_n | x_n))^2`; `"kronecker"`, the K-FAC factors `A_W = E_t[x x^T]` (mean over the counted
    tokens of all samples) and `S_W = (1/N) sum_n sum_t e e^T` (module docstring).

    prompts: token ids of chat prompts already rendered with the generation prompt.
    responses: the dataset responses (token ids), required with `cfg.labels == "empirical"` and refused
        otherwise (the sampled labels come from the model, see `sample_responses`).
    Returns, on CPU, float64 for a float64 model and float32 otherwise: diagonal, {parameter name:
    tensor shaped like the weight}; kronecker, {name + ".kfac_A": A (d_in, d_in), name + ".kfac_S":
    S (d_out, d_out)} (`fisher_tensor_shapes`), in the order of the scored weights. The model is
    left as found: hooks removed, train/eval modes restored, `.grad` and `requires_grad` untouched,
    the global RNG not consumed.
    """
    if not isinstance(cfg, FisherConfig):
        raise TypeError(f"cfg: expected a FisherConfig, got {type(cfg).__name__}")
    vocab_size = model.get_input_embeddings().num_embeddings
    prompts = _check_token_lists("prompts", prompts, vocab_size)
    if not prompts:
        raise ValueError("prompts: need at least one Fisher prompt, got an empty list")
    if cfg.labels == "empirical":
        if responses is None:
            raise ValueError("responses: required when FisherConfig.labels == 'empirical'")
        responses = _check_token_lists("responses", responses, vocab_size, count=len(prompts))
    elif responses is not None:
        raise ValueError("responses: only used when FisherConfig.labels == 'empirical' "
                         f"(labels={cfg.labels!r} samples them from the model)")
    linears = scored_linears(model, cfg.last_k)
    first_block = scored_blocks(model, cfg.last_k)[0][1]
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = _pad_token_id(tokenizer, stop_ids)
    if cfg.labels == "sampled" and not stop_ids:
        log.warning("no eos token known: every sampled response runs to max_new_tokens=%d", cfg.max_new_tokens)

    acc_dtype = torch.float64 if all(l.weight.dtype == torch.float64 for l in linears.values()) else torch.float32
    sums = (_KroneckerSums if cfg.kind == "kronecker" else _DiagonalSums)(linears, acc_dtype)
    modes = {module: module.training for module in model.modules()}
    model.eval()  # the reference model's distribution: no dropout
    capture = _LinearCapture(first_block, linears)
    n_tokens, n_stopped = 0, 0
    try:
        with tqdm(total=len(prompts), desc="fisher", unit="prompt", disable=not progress) as bar:
            for start in range(0, len(prompts), cfg.batch_size):
                indices = list(range(start, min(start + cfg.batch_size, len(prompts))))
                batch_prompts = [prompts[i] for i in indices]
                if cfg.labels == "sampled":  # the capture hooks are inactive while generating
                    batch_responses = _sample_batch(model, batch_prompts, indices, cfg, stop_ids, pad_id)
                else:
                    batch_responses = [responses[i] for i in indices]
                _accumulate_batch(model, capture, batch_prompts, batch_responses, pad_id, sums)
                n_tokens += sum(len(r) for r in batch_responses)
                n_stopped += sum(1 for r in batch_responses if r[-1] in stop_ids)
                bar.update(len(indices))
    finally:
        capture.remove()
        for module, training in modes.items():
            module.training = training
    log.info("%s Fisher over %d prompts (%s labels): %d response tokens, %d responses end with eos, "
             "%d stop at max_new_tokens", cfg.kind, len(prompts), cfg.labels, n_tokens, n_stopped, len(prompts) - n_stopped)
    return sums.result(len(prompts))


def _metadata(model: nn.Module, names: list[str], cfg: FisherConfig, num_prompts: int, dtype) -> dict[str, str]:
    config = getattr(model, "config", None)
    return {
        "format": FORMAT,
        "library_version": __version__,
        "model_name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "model_type": str(getattr(config, "model_type", "") or ""),
        "weights_fingerprint": weights_fingerprint(model),
        "param_names": json.dumps(names),
        "num_params": str(len(names)),
        "num_prompts": str(num_prompts),
        "dtype": str(dtype).removeprefix("torch."),
        **{field.name: json.dumps(getattr(cfg, field.name)) for field in fields(cfg)},
    }


def save_fisher(path: str | Path, fisher: dict[str, torch.Tensor], model: nn.Module, cfg: FisherConfig,
                num_prompts: int) -> Path:
    """Write `fisher` as safetensors with string metadata: format, library version, model identity
    (`_name_or_path`, `model_type`, weights fingerprint), parameter names and count, number of prompts,
    dtype and every FisherConfig field (`kind` among them). `fisher` holds exactly the tensors of
    `fisher_tensor_shapes(scored weights, cfg.kind)`; `model` must be the reference model it was
    computed on. Written to a temporary file and renamed, so a crash never leaves a half-written cache."""
    path = Path(path)
    try:
        kind = fisher_kind(fisher)
    except ValueError as err:
        raise ValueError(f"save_fisher({path}): {err}") from None
    if kind != cfg.kind:
        raise ValueError(f"save_fisher({path}): the tensors are a {kind} Fisher, the config says kind={cfg.kind!r}")
    linears = scored_linears(model, cfg.last_k)
    expected = fisher_tensor_shapes(linears, cfg.kind)
    what = "weight shape" if cfg.kind == "diagonal" else "factor shape"
    problems = [f"missing parameter {name}" for name in expected if name not in fisher]
    problems += [f"unexpected parameter {name}" for name in fisher if name not in expected]
    problems += [f"{name}: shape {tuple(fisher[name].shape)} != {what} {shape}"
                 for name, shape in expected.items() if name in fisher and tuple(fisher[name].shape) != shape]
    if problems:
        raise ValueError(f"save_fisher({path}): the Fisher does not match the scored weights of the model "
                         f"(last_k={cfg.last_k}, kind={cfg.kind}): " + "; ".join(problems))
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"save_fisher({path}): num_prompts must be an integer >= 1, got {num_prompts!r}")
    dtypes = {t.dtype for t in fisher.values()}
    if len(dtypes) != 1:
        raise ValueError(f"save_fisher({path}): mixed dtypes {sorted(map(str, dtypes))}")
    tensors = {name: fisher[name].detach().to("cpu").contiguous() for name in expected}
    metadata = _metadata(model, list(linears), cfg, num_prompts, dtypes.pop())  # param_names: the scored weights
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(deterministic_safetensors(tensors, metadata))
    os.replace(partial, path)
    return path


def read_fisher_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a Fisher file (strings, see `save_fisher`)."""
    return read_safetensors_metadata(path, FORMAT, FisherMismatchError, "Fisher",
                                     "not a Fisher written by alphatoken.fisher.save_fisher")


def load_fisher(path: str | Path, model: nn.Module, cfg: FisherConfig | None = None) -> dict[str, torch.Tensor]:
    """Load a Fisher written by `save_fisher` after checking it belongs to `model` (same weights
    fingerprint, exactly the tensors of the scored parameters for the stored `last_k` and `kind`,
    same shapes) and, when `cfg` is given, to `cfg` (same last_k, kind, labels, temperature, top_p,
    max_new_tokens, seed; batch_size may differ): a file of one kind loaded under the other kind is
    refused, naming the field 'kind'. A file written before `kind` existed is diagonal. Raises
    FisherMismatchError naming the file and every field that differs, with the expected and the
    found value. Returns {tensor name: tensor} on CPU in the order of the scored weights: the
    parameter names (diagonal) or the factor names (kronecker, see `fisher_tensor_shapes`)."""
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_fisher_metadata(path)
    problems = []

    def differs(field: str, expected, found):
        problems.append(f"field {field!r}: expected {expected!r}, found {found!r}")

    stored = {}
    for field in fields(FisherConfig):
        if field.name in metadata:
            stored[field.name] = json.loads(metadata[field.name])
        elif field.name in LEGACY_FIELDS:  # written before the field existed, when it had one value
            stored[field.name] = LEGACY_FIELDS[field.name]
        else:
            differs(field.name, "a value", None)
            continue
        if cfg is not None and field.name in RESULT_FIELDS and getattr(cfg, field.name) != stored[field.name]:
            differs(field.name, getattr(cfg, field.name), stored[field.name])
    kind = stored.get("kind")
    if kind not in FISHER_KINDS:
        differs("kind", f"one of {list(FISHER_KINDS)}", kind)
        kind = None
    fingerprint = weights_fingerprint(model)
    if metadata.get("weights_fingerprint") != fingerprint:
        differs("weights_fingerprint", fingerprint, metadata.get("weights_fingerprint"))
        problems[-1] += " (the Fisher was computed for other weights)"
    tensors = load_file(str(path))
    if "last_k" in stored and kind is not None:
        linears = scored_linears(model, int(stored["last_k"]))
        expected = fisher_tensor_shapes(linears, kind)
        what = "scored weights" if kind == "diagonal" else f"Kronecker factors of the {len(linears)} scored weights"
        missing = [name for name in expected if name not in tensors]
        extra = [name for name in tensors if name not in expected]
        if missing:
            differs("param_names", f"all {len(expected)} {what}", f"missing {missing}")
        if extra:
            differs("param_names", f"only the {len(expected)} {what}", f"extra {extra}")
        for name, shape in expected.items():
            if name in tensors and tuple(tensors[name].shape) != shape:
                differs(f"shape of {name}", shape, tuple(tensors[name].shape))
    listed = json.loads(metadata.get("param_names", "[]"))  # the scored weights, in model order
    names = [name + suffix for name in listed for suffix in KRONECKER_SUFFIXES] if kind == "kronecker" else listed
    if sorted(names) != sorted(tensors):
        differs("param_names", f"the {len(tensors)} stored tensors", f"{len(listed)} listed names"
                + (f" ({len(names)} factors)" if kind == "kronecker" else ""))
    if problems:
        raise FisherMismatchError(f"{path}: Fisher does not match: " + "; ".join(problems))
    return {name: tensors[name] for name in names}  # model order, as computed


def encode_fisher_prompts(examples: list, tokenizer, max_length: int) -> tuple[list, list, Counter]:
    """(prompt token ids rendered with the generation prompt, response token ids, Counter of skipped
    examples by reason) of the Fisher hold-out; overlong examples are truncated, as in training."""
    prompts, responses, skipped = [], [], Counter()
    for example in examples:
        try:
            encoded = encode_chat(example, tokenizer, max_length, overlong="truncate")
        except ExampleDropped as err:
            skipped[err.reason] += 1
            continue
        start = next(t for t, y in enumerate(encoded["labels"]) if y != IGNORE_INDEX)  # first response token
        prompts.append(encoded["input_ids"][:start])
        responses.append([y for y in encoded["labels"][start:] if y != IGNORE_INDEX])
    return prompts, responses, skipped

"""Memory planner: the per-GPU memory of each training rule of a parameter set, and whether it fits.

    python -m alphatoken.plan --configfile configs/paper-qwen3.5-9b-sft.yaml [--params params.yaml]

The parameter files are merged as the pipeline merges them (params.yaml, then each overlay, with
`alphatoken.stages.common.merge_params`). The rules planned follow `routes`: `sft` -> fisher, train;
`dpo` -> warmstart_sft, fisher_dpo, train_dpo.

Model shapes. A local model directory (`model.name_or_path` holding config.json) is read; a hub id is
looked up in `PAPER_SHAPES` (the config.json values of the paper models, source noted per entry; no
download); the embedded and tiny models are counted from the built model (`shape_of_model`).

Formulas (bytes per GPU; P = parameters, P_K = weights of the nn.Linear layers of the last K blocks,
S = world size, B = sequences per micro-batch (DPO: 2 x pairs), T = max_length, h = hidden size,
I = intermediate size, q = heads x head_dim, kv = kv_heads x head_dim, H = heads, L = layers,
V = vocabulary, a = bytes of an activation: 2 under bf16 autocast, else the weights dtype's size w):

- weights       w P            (fsdp: w P / S, plus two gathered bf16 blocks in flight: 2 x 2 P_block)
- gradients     w P            (fsdp: / S; `none`, the hand-made flat all-reduce: + w P for the flat copy)
- optimizer     2 w P (AdamW m, v; fsdp: / S). Fisher rules: no gradients of all weights, no optimizer.
- activations   per layer and token, stored for backward: 4h (norm inputs/outputs) + (q + 2 kv) + q
                (attention output) + 4I (gate, up, act(gate), act x up): a B T L (6h + 4... see
                `_layer_elements`); eager attention adds 2 H T elements per token (scores, probabilities).
                With gradient checkpointing: the block inputs a B T h L, plus one block recomputed.
                The head and the loss: 12 B T V (fp32 logits, log-softmax, their gradient).
- valuation     scoring policies only, replicated on every rank (the last K blocks are not sharded):
                G, F, P, W_ref: 4 x 4 P_K; captured attention bands 2 x 4 B H T W per scored block
                (band and its gradient); per-token activations and errors of each scored linear
                4 B T (in + out).
- Fisher rules  weights w P; activations of the last K blocks only (the graph starts at the first
                scored block, `alphatoken.fisher`), one earlier block's in flight, the head and the loss;
                the per-sample gradients of one scored linear for a chunk of samples at a time,
                4 max(out x in, min(B out x in, PER_SAMPLE_ELEMENTS)), and F 4 P_K; at
                fisher.batch_size x fisher.max_length, on one GPU.

A rule fits when the total is at most `HEADROOM` (90%) of the GPU's memory (the rest: CUDA context,
allocator fragmentation, NCCL buffers). The GPU: `resources.<rule>.gpu_mem_gb` when set, else the
profile's `set-resources.<rule>.gpu_model` (workflow/profiles/slurm/config.yaml) in `GPU_MEMORY_GB`;
the world size: `resources.<rule>.gpu`. `distributed` (none | ddp | fsdp) is read from the section
(`<section>.distributed`, default none) and every rule is printed under ddp and fsdp as well.
These are estimates; `bench/plan_vs_rss.py` compares them with a measured CPU peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

from alphatoken.stages.common import merge_params

GIB = 1024**3
HEADROOM = 0.9
DISTRIBUTED = ("none", "ddp", "fsdp")
PROFILE = Path(__file__).resolve().parent.parent / "workflow" / "profiles" / "slurm" / "config.yaml"
GPU_MEMORY_GB = {"a100": 80, "a100-80gb": 80, "a100-40gb": 40, "h100": 80, "h200": 141, "l40s": 48}  # GiB
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only LM that set its memory (config.json names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    source: str = ""

    @property
    def q(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the nn.Linear layers of one block: q, k, v, o, gate, up, down."""
        h, i = self.hidden_size, self.intermediate_size
        return [(h, self.q), (h, self.kv), (h, self.kv), (self.q, h), (h, i), (h, i), (i, h)]

    def block_params(self) -> int:
        return sum(a * b for a, b in self.linears()) + 2 * self.hidden_size  # + two RMSNorm weights

    def params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        return self.num_hidden_layers * self.block_params() + embed * (1 if self.tie_word_embeddings else 2) \
            + self.hidden_size  # final norm

    def scored_params(self, last_k: int) -> int:
        return min(last_k, self.num_hidden_layers) * sum(a * b for a, b in self.linears())


# config.json values of the paper models' text decoders (hub ids of configs/paper-*.yaml), entered by hand on an
# offline machine and not read from the downloaded files: check them against config.json before relying on a plan
# (a local model directory's config.json always takes precedence)
PAPER_SHAPES = {
    "meta-llama/Llama-3.2-3B": Shape(128256, 3072, 8192, 28, 24, 8, 128, True,
                                     "huggingface.co/meta-llama/Llama-3.2-3B config.json"),
    "google/gemma-3-4b-pt": Shape(262208, 2560, 10240, 34, 8, 4, 256, True,
                                  "huggingface.co/google/gemma-3-4b-pt config.json, text_config"),
    # Qwen3.5-9B is a hybrid (3 Gated-DeltaNet layers per gated-attention layer); counted here as if every
    # layer had full attention projections of these sizes, which over-counts its linear-attention layers
    "Qwen/Qwen3.5-9B-Base": Shape(248320, 4096, 12288, 32, 16, 4, 256, False,
                                  "huggingface.co/Qwen/Qwen3.5-9B-Base config.json, text_config (hybrid: see note)"),
}


class PlanError(ValueError):
    """A parameter set the planner cannot read (names the file and the field)."""


def shape_from_config(config: dict, source: str) -> Shape:
    """A Shape from a config.json mapping (a multimodal wrapper's `text_config` if present)."""
    text = config.get("text_config") or config
    try:
        heads = text["num_attention_heads"]
        return Shape(text["vocab_size"], text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"],
                     heads, text.get("num_key_value_heads", heads), text.get("head_dim") or text["hidden_size"] // heads,
                     bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))), source)
    except KeyError as err:
        raise PlanError(f"{source}: config.json lacks {err.args[0]!r}") from err


def shape_of_model(model) -> Shape:
    """The Shape of a built Hugging Face model (its config)."""
    config = model.config.to_dict()
    config["tie_word_embeddings"] = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return shape_from_config(config, f"{type(model).__name__} config")


def model_shape(model: dict) -> Shape:
    """The Shape of the `model` section: a local directory's config.json, or the paper table for a hub id."""
    source, name = model.get("source"), model.get("name_or_path") or ""
    if source == "hub":
        config = Path(name) / "config.json"
        if config.is_file():
            return shape_from_config(json.loads(config.read_text()), str(config))
        if name in PAPER_SHAPES:
            return PAPER_SHAPES[name]
        raise PlanError(f"model.name_or_path: {name!r} is neither a local directory with config.json nor a model of "
                        f"the planner's table ({sorted(PAPER_SHAPES)}): download it or pass its directory")
    from alphatoken.models import ModelSpec, load_model  # the embedded or tiny model: build it and read its config

    built, _ = load_model(ModelSpec(**{k: v for k, v in model.items() if k in {f.name for f in
                                                                                  dataclasses.fields(ModelSpec)}}))
    return shape_of_model(built)


@dataclasses.dataclass(frozen=True)
class Run:
    """What one training rule does to memory."""

    rule: str
    section: str
    sequences: int  # per micro-batch, per GPU
    max_length: int
    dtype: str
    bf16: bool
    gradient_checkpointing: bool
    attn_implementation: str
    scores: bool  # a scoring policy among the methods: the valuation extras
    last_k: int
    window: int
    gpus: int
    distributed: str = "none"
    fisher: bool = False  # the Fisher stage: no optimizer, per-sample gradients


def _layer_elements(shape: Shape, seq_len: int, eager: bool) -> int:
    """Activation elements stored per token by one block for its backward."""
    h, i = shape.hidden_size, shape.intermediate_size
    n = 4 * h + (shape.q + 2 * shape.kv) + shape.q + 4 * i
    return n + (2 * shape.num_attention_heads * seq_len if eager else 0)


def estimate(shape: Shape, run: Run, distributed: str | None = None, checkpointing: bool | None = None) -> dict:
    """Bytes per GPU of each component (see the module docstring), and their total."""
    distributed = run.distributed if distributed is None else distributed
    if distributed not in DISTRIBUTED:
        raise PlanError(f"{run.section}.distributed: {distributed!r} is not one of {list(DISTRIBUTED)}")
    checkpointing = run.gradient_checkpointing if checkpointing is None else checkpointing
    w = DTYPE_BYTES[run.dtype]
    a = 2 if run.bf16 else w
    p, pk = shape.params(), shape.scored_params(run.last_k)
    b, t, layers = run.sequences, run.max_length, shape.num_hidden_layers
    shard = run.gpus if distributed == "fsdp" else 1
    out = {"weights": w * p // shard}
    if distributed == "fsdp":
        out["weights"] += 2 * 2 * shape.block_params()
    per_layer = a * b * t * _layer_elements(shape, t, run.attn_implementation == "eager")
    if run.fisher:
        from alphatoken.fisher import PER_SAMPLE_ELEMENTS

        k = min(run.last_k, layers)
        out["gradients"], out["optimizer"] = 0, 0
        out["activations"] = (k + (1 if k < layers else 0)) * per_layer + 12 * b * t * shape.vocab_size
        largest = max(i * o for i, o in shape.linears())
        out["valuation"] = 4 * max(largest, min(b * largest, PER_SAMPLE_ELEMENTS)) + 4 * pk
    else:
        out["gradients"] = w * p // shard + (w * p if distributed == "none" and run.gpus > 1 else 0)
        out["optimizer"] = 2 * w * p // shard
        body = a * b * t * shape.hidden_size * layers + per_layer if checkpointing else layers * per_layer
        out["activations"] = body + 12 * b * t * shape.vocab_size
        out["valuation"] = 0
        if run.scores:
            k = min(run.last_k, layers)
            out["valuation"] = (16 * pk + k * 2 * 4 * b * shape.num_attention_heads * t * run.window
                                + k * 4 * b * t * sum(i + o for i, o in shape.linears()))
    out["total"] = sum(out.values())
    return out


def gpu_memory(params: dict, rule: str, profile: Path = PROFILE) -> tuple[int, int, str]:
    """(bytes per GPU, GPU count, where from) of `rule`."""
    resources = (params.get("resources") or {}).get(rule) or {}
    gpus = int(resources.get("gpu", 1) or 1)
    if resources.get("gpu_mem_gb"):
        return int(resources["gpu_mem_gb"] * GIB), gpus, f"resources.{rule}.gpu_mem_gb"
    model = resources.get("gpu_model")
    if model is None and profile.is_file():
        model = ((yaml.safe_load(profile.read_text()) or {}).get("set-resources") or {}).get(rule, {}).get("gpu_model")
    if model is None:
        raise PlanError(f"{profile}: set-resources.{rule}.gpu_model is not set (or set resources.{rule}.gpu_mem_gb)")
    if str(model).lower() not in GPU_MEMORY_GB:
        raise PlanError(f"{profile}: set-resources.{rule}.gpu_model={model!r} is not in the planner's table "
                        f"({sorted(GPU_MEMORY_GB)}): set resources.{rule}.gpu_mem_gb")
    return GPU_MEMORY_GB[str(model).lower()] * GIB, gpus, f"{profile.name}: gpu_model {model}"


def runs(params: dict) -> list[Run]:
    """The training rules of the merged parameters (per `routes`)."""
    from alphatoken.policies import POLICIES

    from alphatoken.fisher import FisherConfig
    from alphatoken.train import TrainConfig
    from alphatoken.valuation import ValuationConfig

    def default(cls, name):  # the value a stage uses when the section leaves `name` out
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    valuation = params.get("valuation") or {}
    k = int(valuation.get("last_k", default(ValuationConfig, "last_k")))
    window = int(valuation.get("window", default(ValuationConfig, "window")))
    out = []

    def gpus(rule):
        return int(((params.get("resources") or {}).get(rule) or {}).get("gpu", 1) or 1)

    def training(rule, name, pairs, methods):
        section = params.get(name) or {}
        scores = any(POLICIES[m].needs_scores for m in methods if m in POLICIES)
        scores |= any(POLICIES.get(v.get("policy"), POLICIES["full"]).needs_scores
                      for v in (section.get("variants") or {}).values())
        def get(key):
            return section.get(key, default(TrainConfig, key))

        return Run(rule, name, int(get("micro_batch_size")) * (2 if pairs else 1),
                   int(get("max_length")), section.get("dtype", "float32"), bool(get("bf16")),
                   bool(get("gradient_checkpointing")), section.get("attn_implementation", "eager"),
                   scores, k, window, gpus(rule), section.get("distributed", "none"))

    def fisher(rule):
        section = params.get("fisher") or {}
        return Run(rule, "fisher", int(section.get("batch_size", default(FisherConfig, "batch_size"))),
                   int(section.get("max_length", 1024)),  # the fisher stage's default
                   section.get("dtype", "float32"), False, False, section.get("attn_implementation", "sdpa"),
                   True, int(section.get("last_k", default(FisherConfig, "last_k"))), window, 1, fisher=True)

    routes = params.get("routes") or ["sft"]
    if "sft" in routes:
        out += [fisher("fisher"), training("train", "train", False, (params.get("train") or {}).get("methods") or [])]
    if "dpo" in routes:
        out += [training("warmstart_sft", "warmstart", False, ["full"]), fisher("fisher_dpo"),
                training("train_dpo", "dpo", True, (params.get("dpo") or {}).get("methods") or [])]
    return out


def fit_advice(run: Run, budget: int, shape: Shape) -> str:
    """The settings to change, tried in order, for a run that does not fit `budget`."""
    fits = []
    if run.fisher:
        return f"lower fisher.batch_size (now {run.sequences}) or fisher.max_length (now {run.max_length})"
    if not run.gradient_checkpointing and estimate(shape, run, checkpointing=True)["total"] <= HEADROOM * budget:
        fits.append(f"{run.section}.gradient_checkpointing: true")
    if run.distributed != "fsdp" and run.gpus > 1 and estimate(shape, run, "fsdp", True)["total"] <= HEADROOM * budget:
        fits.append(f"{run.section}.distributed: fsdp (with gradient_checkpointing: true)")
    if run.attn_implementation == "eager":
        fits.append(f"{run.section}.attn_implementation: sdpa")
    fits.append(f"a lower {run.section}.micro_batch_size (now {run.sequences // (2 if run.section == 'dpo' else 1)}) "
                f"with a higher grad_accum_steps, or a lower {run.section}.max_length (now {run.max_length})")
    return "; or ".join(fits)


def refusal(shape: Shape, run: Run, budget: int) -> str | None:
    """None when `run` fits a GPU of `budget` bytes, else the message naming the settings to change."""
    total = estimate(shape, run)["total"]
    if total <= HEADROOM * budget:
        return None
    return (f"{run.rule}: the memory planner estimates {total / GIB:.3g} GiB per GPU under {run.section}.distributed="
            f"{run.distributed}, more than {HEADROOM:.0%} of the GPU's {budget / GIB:.3g} GiB (python -m alphatoken.plan): "
            f"set {fit_advice(run, budget, shape)}")


def check_train_config(model, config, section: str, rule: str, world: int, attn_implementation: str,
                       budget: int, objective: str = "sft", dtype: str = "float32", distributed: str = "none") -> None:
    """Raise PlanError naming the settings to change when the train stage's run (a TrainConfig on `model`, `world`
    ranks) does not fit a GPU of `budget` bytes per the planner."""
    from alphatoken.policies import get_policy

    run = Run(rule, section, config.micro_batch_size * (2 if objective == "dpo" else 1), config.max_length, dtype,
              config.bf16, config.gradient_checkpointing, attn_implementation,
              get_policy(config.policy.name).needs_scores, getattr(config.valuation, "last_k", 3),
              getattr(config.valuation, "window", 32), world, distributed)
    message = refusal(shape_of_model(model), run, budget)
    if message is not None:
        raise PlanError(message)


def read_params(files: list[str | Path]) -> dict:
    merged: dict = {}
    for file in files:
        try:
            data = yaml.safe_load(Path(file).read_text()) or {}
        except yaml.YAMLError as err:
            raise PlanError(f"{file}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise PlanError(f"{file}:1: expected a mapping of sections")
        merged = merge_params(merged, data)
    return merged


def report(params: dict, profile: Path = PROFILE) -> tuple[list[str], bool]:
    """The printed plan and whether every rule fits under its configured `distributed`."""
    shape = model_shape(params.get("model") or {})
    lines = [f"model: {shape.params() / 1e9:.3f}B parameters ({shape.source}); GiB per GPU"]
    ok = True
    for run in runs(params):
        budget, _, where = gpu_memory(params, run.rule, profile)
        lines.append(f"{run.rule} ({run.section}: {run.gpus} GPU x {budget / GIB:.0f} GiB from {where}; "
                     f"{run.sequences} seq x {run.max_length} tokens, checkpointing {run.gradient_checkpointing}, "
                     f"{run.attn_implementation}, valuation {run.scores}, distributed {run.distributed})")
        modes = ["none"] if run.fisher else ["ddp", "fsdp"] + (["none"] if run.distributed == "none" else [])
        for mode in modes:
            for ckpt in ([False] if run.fisher else [False, True]):
                e = estimate(shape, run, mode, ckpt)
                parts = " ".join(f"{k} {v / GIB:.2f}" for k, v in e.items() if k != "total")
                verdict = "fits" if e["total"] <= HEADROOM * budget else "does NOT fit"
                lines.append(f"  {mode:4} ckpt={ckpt!s:5}: {parts} -> total {e['total'] / GIB:.2f} {verdict}")
        message = refusal(shape, run, budget)
        ok &= message is None
        lines.append(f"  as configured: {'fits' if message is None else message}")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--configfile", action="append", default=[], help="overlays, merged in order")
    parser.add_argument("--profile", default=str(PROFILE), help="SLURM profile (gpu_model per rule)")
    args = parser.parse_args(argv)
    try:
        lines, ok = report(read_params([args.params, *args.configfile]), Path(args.profile))
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print("every rule fits" if ok else "some rules do not fit: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

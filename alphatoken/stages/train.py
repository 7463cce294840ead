"""Stage train: one token-masked SFT or DPO run (policy or variant `--method`, seed `--seed`) from the reference
checkpoint, with the cached Fisher for the retention proxy (and, for DPO, the reference log-probs of
the ref_logps stage); writes final/ (HF checkpoint), metrics.json and dvclive/ into --out, and resumes
from its own checkpoints there (refusing one left by a run with other settings, model or data). A LoRA
scoring policy (`alphatoken_lora`) takes the Fisher hold-out instead (`--fisher-prompts`, settings of
`--fisher-section`): its Fisher is that of the adapter factors at step 0, computed by the run and
cached in --out.

    python -m alphatoken.stages.train --params params.yaml --section train --valuation-section valuation \
        --objective sft --method alphatoken --seed 0 --model results/model --train-data results/data/train.jsonl \
        --val-data results/data/val.jsonl --fisher results/fisher.safetensors --out results/train/alphatoken-0
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from alphatoken.blocks import decoder_blocks, scored_linears
from alphatoken.checkpoint import RunMismatchError
from alphatoken.data import DataError, read_split
from alphatoken.fisher import (
    FisherConfig, FisherMismatchError, FisherPrompts, encode_fisher_prompts, fisher_parameter_names, load_fisher,
)
from alphatoken.models import ModelSpec, load_model
from alphatoken.plan import PlanError, check_train_config
from alphatoken.policies import POLICIES, PolicyConfig, get_policy
from alphatoken.runs import refused_method, run_kind
from alphatoken.stages.common import (
    FISHER_STAGE_KEYS, ParamsError, Section, fail, gpus_requested, init_distributed, log_run_environment, read_section,
    relaunch_under_torchrun, split_section, stage_parser, to_config,
)
from alphatoken.train import TrainConfig, train_dpo, train_sft
from alphatoken.train.reference import ReferenceMismatchError
from alphatoken.train.token_rewards import TokenRewardsMismatchError
from alphatoken.valuation import ValuationConfig

MATRIX_KEYS = ("methods", "seeds")  # which runs exist: the rule's wildcards, not settings of one run
VARIANTS_KEY = "variants"  # named runs: a policy with some settings changed (`train.variants.<name>`)
OWN_KEYS = ("dtype", "attn_implementation", "val_examples", "realisation_examples", "distributed")  # how the stage loads model and data
POLICY_KEYS = tuple(f.name for f in dataclasses.fields(PolicyConfig) if f.name != "name")  # train.rho etc.


def resolve_run(section: Section, valuation: Section, method: str) -> tuple[str, Section, Section]:
    """(policy name, run section, valuation section) of run `method`: a token policy of
    `alphatoken.policies` with the sections as they are, or a variant `section.variants.<method>`
    (`{policy: NAME, <keys of the section>..., valuation: {<valuation keys>...}}`) whose values replace
    the section's and the valuation's, located at the variant's lines. The run section comes back
    without `variants`. The name of a run with rules of its own (`alphatoken.runs.RUN_KINDS`: `less`,
    `wiseft_a0.5`, `sepo`) is refused, naming the section that configures it; only the run its own rule
    trains gets through (SePO's `--method sepo`, while `sepo` is not in the section's methods)."""
    kind = run_kind(method)
    if kind is not None and (kind.trained_as != method or method in (section.values.get("methods") or [])):
        raise ParamsError(f"{section.locate('methods')}: {refused_method(section.name, method)}")
    variants = section.values.get(VARIANTS_KEY) or {}
    values = {k: v for k, v in section.values.items() if k != VARIANTS_KEY}
    if method in variants and method in POLICIES:
        raise ParamsError(f"{section.locate(f'{VARIANTS_KEY}.{method}')}: {method!r} is a token policy's name; "
                          "give the variant another name")
    if method not in variants:
        if method not in POLICIES:
            raise ParamsError(f"{section.locate('methods')}: {method!r} is neither a token policy "
                              f"({sorted(POLICIES)}) nor a variant of {section.name}.{VARIANTS_KEY} ({sorted(variants)})")
        return method, dataclasses.replace(section, values=values), valuation
    prefix = f"{VARIANTS_KEY}.{method}."
    variant = dict(variants[method])
    policy = variant.pop("policy", None)
    if policy not in POLICIES:
        raise ParamsError(f"{section.locate(prefix + 'policy')}: {policy!r} is not a token policy; expected one of "
                          f"{sorted(POLICIES)}")
    valuation_values = variant.pop("valuation", None) or {}
    for key in (*MATRIX_KEYS, VARIANTS_KEY):
        if key in variant:
            raise ParamsError(f"{section.locate(prefix + key)}: a variant sets the settings of one run, not {key}")
    where = {**section.where, **{k: section.where.get(prefix + k, section.where[""]) for k in variant}}
    run = Section(section.name, {**values, **variant}, where)
    vwhere = {**valuation.where, **{k: section.where.get(f"{prefix}valuation.{k}", section.where[""]) for k in valuation_values}}
    return policy, run, Section(valuation.name, {**valuation.values, **valuation_values}, vwhere)


def check_distributed(section_name: str, value: str) -> None:
    """Refuse a `distributed` mode the engine does not run yet, rather than train replicated under its name.

    The memory planner (alphatoken.plan) accepts none | ddp | fsdp so configs can be sized for sharding; the training
    loop itself replicates the model on every rank and all-reduces one flat gradient (`none`)."""
    if value != "none":
        raise ParamsError(f"{section_name}.distributed: {value!r}: the training loop runs replicated only "
                          "(distributed: none, one flat gradient all-reduce per step); ddp and fsdp are sized by "
                          "`python -m alphatoken.plan` but not trained yet (docs/TRAINING.md, Memory planner)")


def read_train_config(params: list, section_name: str, valuation_section: str, method: str, seed: int,
                      out: str) -> tuple[dict, TrainConfig]:
    """(the stage's own settings, the TrainConfig) of run `method` (a policy or a variant, see
    `resolve_run`) from the parameter files; ParamsError names file, line and field of a bad value."""
    policy_name, section, valuation_section_values = run_sections(params, section_name, valuation_section, method)
    _, section = split_section(section, MATRIX_KEYS)
    own, rest = split_section(section, OWN_KEYS)
    policy_values, rest = split_section(rest, POLICY_KEYS)
    policy = to_config(dataclasses.replace(section, values=policy_values), PolicyConfig, name=policy_name)
    valuation = to_config(valuation_section_values, ValuationConfig)
    config = to_config(rest, TrainConfig, output_dir=out, seed=seed, policy=policy, valuation=valuation)
    if "epochs" in rest.values and config.max_steps is not None:  # max_steps decides the length: epochs is unused
        raise ParamsError(f"{rest.locate('epochs')}: {config.epochs} is not used while {section_name}.max_steps="
                          f"{config.max_steps} ({rest.where.get('max_steps', rest.where[''])}) is set: set max_steps: "
                          "null to train by epochs, or remove epochs")
    return own, config


def run_sections(params: list, section_name: str, valuation_section: str, method: str) -> tuple[str, Section, Section]:
    """`resolve_run` on the sections read from the parameter files."""
    return resolve_run(read_section(params, section_name), read_section(params, valuation_section), method)


def check_against_model(model, config: TrainConfig, params: list, section_name: str, valuation_section: str,
                        scores: bool, fisher_section: str | None = None, method: str | None = None) -> None:
    """Settings that only the loaded model (its depth) and the run (does its policy score tokens?) can
    check: ParamsError for a valuation.last_k (or, for a run computing its own Fisher, a fisher.last_k)
    beyond the model's decoder blocks; a warning on stderr for a valuation.window that reaches past
    train.max_length, where the band stops at the sequence end (refusing it would break a valuation
    section shared by routes of different max_length)."""
    if not scores:
        return
    depth = len(decoder_blocks(model))
    valuation = read_section(params, valuation_section)
    if method is not None:  # a variant's own valuation values, at their lines
        valuation = run_sections(params, section_name, valuation_section, method)[2]
    sections = [valuation] + ([read_section(params, fisher_section)] if fisher_section else [])
    for section in sections:
        last_k = section.values.get("last_k", config.valuation.last_k if section is valuation else FisherConfig.last_k)
        if last_k > depth:
            raise ParamsError(f"{section.locate('last_k')}: {last_k} is more than the {depth} decoder blocks of "
                              f"the model; set it to at most {depth}")
    if config.valuation.window >= config.max_length:
        print(f"warning: {valuation.locate('window')}: {config.valuation.window} >= {section_name}.max_length="
              f"{config.max_length}: the value path of a token stops at the sequence end, so this run uses "
              f"window {config.max_length - 1} (the whole sequence)", file=sys.stderr, flush=True)


def read_fisher_prompts(params: list, section_name: str, path: str, tokenizer, last_k: int) -> FisherPrompts:
    """The Fisher hold-out at `path` with the FisherConfig of section `section_name`, for a run that
    computes the Fisher of its LoRA factors at step 0 (the section's dtype/attn_implementation do not
    apply: the run's model is the one trained). Skipped examples are counted in the log."""
    own, rest = split_section(read_section(params, section_name), FISHER_STAGE_KEYS)
    cfg = to_config(rest, FisherConfig)
    if cfg.last_k < last_k:
        raise ParamsError(f"{rest.locate('last_k')}: {cfg.last_k} is below valuation.last_k={last_k}")
    prompts, responses, skipped = encode_fisher_prompts(read_split(path), tokenizer, own.get("max_length", 1024))
    if not prompts:
        raise DataError(f"{path}: no usable Fisher prompt (skipped: {dict(skipped)})")
    print(f"[train] {len(prompts)} Fisher prompts from {path} ({sum(skipped.values())} skipped: {dict(skipped)})")
    return FisherPrompts(prompts, cfg, responses if cfg.labels == "empirical" else None)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--valuation-section", required=True, help="section of the token valuation settings")
    parser.add_argument("--objective", choices=("sft", "dpo"), required=True)
    for flag in ("--method", "--model", "--train-data", "--val-data", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--fisher", help="cached Fisher of --model (needed by the policies that score tokens)")
    parser.add_argument("--fisher-prompts", help="Fisher hold-out (JSONL); used only by the LoRA scoring policies, which "
                        "compute the Fisher of their adapter factors at step 0")
    parser.add_argument("--fisher-section", default="fisher", help="section of the Fisher settings (with --fisher-prompts)")
    parser.add_argument("--reference-logps", help="reference log-probs of --model on the training data (ref_logps "
                        "stage); without it the run computes them itself")
    parser.add_argument("--token-rewards", help="per-token rewards of the training pairs (sepo_scores stage); read by "
                        "the policies that select by them (sepo)")
    parser.add_argument("--realisation-data", help="held-out target examples (JSONL, never trained on, never in G): "
                        "the probes of the value-realisation record (train.realisation_every)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rule", default="train", help="the rule whose `resources` (threads, gpu) apply")
    args = parser.parse_args(argv)
    try:
        own, config = read_train_config(args.params, args.section, args.valuation_section, args.method, args.seed, args.out)
    except ParamsError as err:
        fail(str(err))
    valuation = config.valuation
    gpus = gpus_requested(args.params, args.rule)
    if gpus > 1 and "LOCAL_RANK" not in os.environ:
        relaunch_under_torchrun("alphatoken.stages.train", sys.argv[1:] if argv is None else argv, gpus)
    try:
        check_distributed(args.section, own.get("distributed", "none"))
    except ParamsError as err:
        fail(str(err))
    rank, world, device = init_distributed()
    log_run_environment(args.rule, device, args.params)
    model, tokenizer = load_model(ModelSpec(source="hub", name_or_path=args.model, dtype=own.get("dtype", "float32"),
                                            attn_implementation=own.get("attn_implementation", "eager")), device)
    if str(device).startswith("cuda"):  # refuse a run the memory planner says cannot fit this GPU
        try:
            check_train_config(model, config, args.section, args.rule, world, own.get("attn_implementation", "eager"),
                               torch.cuda.get_device_properties(torch.device(device)).total_memory, args.objective,
                               own.get("dtype", "float32"), own.get("distributed", "none"))
        except PlanError as err:
            fail(str(err))
    fisher, fisher_prompts, policy = None, None, get_policy(config.policy.name)
    try:
        check_against_model(model, config, args.params, args.section, args.valuation_section, policy.needs_scores,
                            args.fisher_section if policy.adapter == "lora" else None, method=args.method)
    except ParamsError as err:
        fail(str(err))
    if policy.needs_scores and policy.adapter == "lora":
        if not args.fisher_prompts:
            fail(f"policy {args.method!r} scores the LoRA factors with the retention proxy: pass --fisher-prompts "
                 "(the Fisher hold-out); the run computes the factors' Fisher at step 0")
        if args.fisher:  # the pipeline's rules pass both inputs to every run
            print(f"[train] {args.method}: --fisher {args.fisher} (full weights) is not used: the proxy needs the "
                  "Fisher of the LoRA factors, computed from --fisher-prompts")
        try:
            fisher_prompts = read_fisher_prompts(args.params, args.fisher_section, args.fisher_prompts, tokenizer,
                                                 valuation.last_k)
        except ParamsError as err:
            fail(str(err))
        except (DataError, FileNotFoundError) as err:
            fail(f"{err} (rerun prepare_data)")
    elif args.fisher:  # --fisher-prompts, if given, serves only the LoRA scoring policies
        try:
            fisher = {k: v.to(device) for k, v in load_fisher(args.fisher, model).items()}
        except (FisherMismatchError, FileNotFoundError) as err:
            fail(f"{err} (the Fisher must be computed on --model in the same dtype: set fisher.dtype = "
                 f"{args.section}.dtype, then rerun the fisher rule)")
        try:
            covered = set(fisher_parameter_names(fisher))  # a diagonal Fisher or the factors of a Kronecker one
        except ValueError as err:
            fail(f"{args.fisher}: {err}")
        missing = [name for name in scored_linears(model, valuation.last_k) if name not in covered]
        if missing:
            fail(f"{args.valuation_section}.last_k={valuation.last_k} scores weights the Fisher lacks ({missing[0]}, ...): "
                 "raise fisher.last_k to at least valuation.last_k and rerun the fisher rule")
    elif policy.needs_scores:
        fail(f"policy {args.method!r} scores tokens with the retention proxy: pass --fisher (the rule's Fisher input)")
    try:
        train, val = read_split(args.train_data), read_split(args.val_data)
    except (DataError, FileNotFoundError) as err:
        fail(f"{err} (rerun prepare_data)")
    val = val[: own["val_examples"]] if own.get("val_examples") else val
    realisation = {}
    if config.realisation_every:
        if not args.realisation_data:
            fail(f"{args.section}.realisation_every={config.realisation_every}: pass --realisation-data (held-out "
                 "target examples; the rule passes the test hold-out)")
        try:
            held_out = read_split(args.realisation_data)
        except (DataError, FileNotFoundError) as err:
            fail(f"{err} (rerun prepare_data)")
        n = own.get("realisation_examples") or len(held_out)
        realisation = {"realisation_data": held_out[:n]}
        print(f"[train] value realisation every {config.realisation_every} steps on {len(val)} validation and "
              f"{len(realisation['realisation_data'])} held-out examples of {args.realisation_data}")
    if policy.needs_token_rewards:
        if args.objective != "dpo" or not args.token_rewards:
            fail(f"policy {args.method!r} selects tokens by the oracle's per-token rewards: run it with --objective dpo "
                 "and --token-rewards (the sepo_scores rule's file); it is configured in the sepo section, not in "
                 f"{args.section}.methods")
        realisation = {**realisation, "token_rewards": args.token_rewards}
    elif args.token_rewards:
        fail(f"--token-rewards: policy {args.method!r} does not select by per-token rewards")
    run = train_dpo if args.objective == "dpo" else train_sft
    try:
        # reference=None: the proxy's W_ref are the weights at step 0, i.e. --model, which load_fisher
        # has just checked is the model the Fisher was computed on
        result = run(model, tokenizer, train, val, config, fisher=fisher, out_dir=args.out,
                     reference_logps=args.reference_logps, fisher_prompts=fisher_prompts, **realisation)
    except RunMismatchError as err:
        fail(str(err))
    except FisherMismatchError as err:
        fail(f"{err} (the Fisher cached in {args.out} belongs to other step-0 weights or Fisher settings: "
             "delete that run directory to start over)")
    except TokenRewardsMismatchError as err:
        fail(f"{err} (rerun the sepo_scores rule)")
    except (ReferenceMismatchError, FileNotFoundError) as err:
        fail(f"{err} (rerun the ref_logps rule)" if args.reference_logps else str(err))
    except ValueError as err:
        fail(f"{err} (check {args.section}.micro_batch_size / grad_accum_steps / max_length)")
    if result.preempted:
        fail(f"preempted after {result.steps} steps; a checkpoint is in {args.out}: rerun the rule to resume")
    if rank == 0:
        resumed = f" (resumed from step {result.start_step})" if result.start_step else ""
        print(f"[train] {args.objective}:{args.method} seed {args.seed}{resumed}: {result.metrics} -> {result.final_dir}")


if __name__ == "__main__":
    main()

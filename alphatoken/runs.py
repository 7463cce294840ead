"""Runs that are not items of a run matrix, in one registry: LESS (a selection stage before training), Wise-FT
(a merge after it) and SePO (DPO runs that need an oracle run of their own).

A run matrix (`train.methods` x `train.seeds`, `dpo.methods` x `dpo.seeds`) is runs that all share one
command and one set of inputs. These do not: each kind is made by rules of its own, configured in its
own parameter section, and listed by its route's report as extra rows
(`--extra-run ROW SEED EVAL_DIR RUN_DIR`). `RUN_KINDS` says, for each kind, what the train stage and the
Snakefile refuse in a `methods` list (and where to configure it instead), and which report rows the
parameters make:

    kind = run_kind("wiseft_a0.5")           # RUN_KINDS["wiseft"]: every name with its prefix is its
    extra_runs(config, "sft")                # [ExtraRun("less", 0, "results/eval/less/less-0", ...), ...]

Nothing here reads params.yaml: the callers pass the merged parameters (a dict of sections).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

ROUTES = ("sft", "dpo")  # the report of the SFT route (results/report) and of the DPO route (results/dpo/report)
WISEFT_ROW_PREFIX = "wiseft_a"  # report row of a Wise-FT merge: wiseft_a<alpha> (alphatoken.merge.row_name)


@dataclass(frozen=True)
class ExtraRun:
    """One row a report lists besides its run matrix."""

    row: str  # the report's row name (`less`, `wiseft_a0.5`, `sepo`)
    seed: int  # the row's seed (rows of one name are averaged over seeds like a method's)
    eval_dir: str  # its evaluation directory
    run_dir: str  # its training run directory (curves, step times), "-" when it has none (a merge)

    def report_arg(self) -> str:
        """The report stage's argument for this row, with its leading space."""
        return f" --extra-run {self.row} {self.seed} {self.eval_dir} {self.run_dir}"


@dataclass(frozen=True)
class RunKind:
    """A kind of run with rules of its own: its name, where it is configured, the rules that make it and
    how its runs (wildcard values, directories, row names) follow from the parameters."""

    name: str  # its row name, or the prefix of its row names when `prefixed` (`wiseft` of `wiseft_a0.5`)
    what: str  # what it is, for messages
    section: str  # the parameter section that configures it
    configured_by: str  # the keys of that section that make its runs
    rules: tuple[str, ...]  # the Snakemake rules that make and evaluate its runs (workflow/rules/*.smk)
    route: str  # the route whose report lists its rows (ROUTES)
    runs: Callable[[Mapping], list[dict]]  # the wildcard values of its runs from the merged parameters ([]: off)
    seed_wildcard: str  # the wildcard of `runs` that is a row's seed
    eval_dir: str  # a run's evaluation directory: a pattern over the wildcards of `runs`
    run_dir: str | None = None  # a run's training directory (pattern); None: no training run (a merge)
    row: Callable[[dict], str] | None = None  # a run's row name from its wildcards; None: `name`
    prefixed: bool = False  # rows are `<name>_<tag>`: every name with that prefix is this kind's
    trained_as: str | None = None  # the token policy its own training rule passes as --method when that is its
    # name (SePO's `sepo`): the train stage runs it, but refuses it as an item of a `methods` list

    def __post_init__(self):
        if self.route not in ROUTES:
            raise ValueError(f"RunKind {self.name!r}: route must be one of {ROUTES}, got {self.route!r}")

    def owns(self, name: str) -> bool:
        """Whether run name `name` is this kind's (`wiseft` and `wiseft_a0.5` are Wise-FT's)."""
        return name == self.name or (self.prefixed and name.startswith(self.name + "_"))

    def refusal(self) -> str:
        """Why this kind is not an item of a `methods` list and where it is configured instead."""
        return (f"it is {self.what}, made by its own rules ({', '.join(self.rules)}) and configured in "
                f"{self.configured_by}")

    def extra_runs(self, config: Mapping) -> list[ExtraRun]:
        """The report rows of this kind's runs under the merged parameters `config`."""
        rows = []
        for wildcards in self.runs(config):
            run_dir = self.run_dir.format(**wildcards) if self.run_dir is not None else "-"
            rows.append(ExtraRun(self.row(wildcards) if self.row else self.name, wildcards[self.seed_wildcard],
                                 self.eval_dir.format(**wildcards), run_dir))
        return rows


def _section(config: Mapping, name: str) -> Mapping:
    return config.get(name) or {}


RUN_KINDS: dict[str, RunKind] = {}


def _register(kind: RunKind) -> None:
    RUN_KINDS[kind.name] = kind


_register(RunKind(
    "less", "LESS, a selection stage before training (Xia et al., ICML 2024: examples chosen by LoRA-gradient "
            "similarity to the validation set, then policy full on them)",
    section="less", configured_by="`less:` in params.yaml (less.enabled, less.seeds)",
    rules=("less", "train_less", "evaluate_less"), route="sft",
    runs=lambda config: ([{"less_seed": seed} for seed in _section(config, "less").get("seeds") or []]
                         if _section(config, "less").get("enabled") else []),
    seed_wildcard="less_seed",
    eval_dir="results/eval/less/less-{less_seed}", run_dir="results/less/train/less-{less_seed}",
))
_register(RunKind(
    "wiseft", "Wise-FT, merges of a trained run with the base model after training (Wortsman et al., CVPR 2022; "
              "rows wiseft_a<alpha>)",
    section="wiseft", configured_by="wiseft.of and wiseft.alphas (one merge per alpha x train.seeds)",
    rules=("wiseft", "evaluate_wiseft"), route="sft",
    runs=lambda config: [{"alpha": alpha, "seed": seed} for alpha in _section(config, "wiseft").get("alphas") or []
                         for seed in _section(config, "train").get("seeds") or []],
    seed_wildcard="seed",
    # the alpha's text is str() of the float, checked by alphatoken.merge.alpha_tag (1.0, not 1)
    eval_dir="results/eval/wiseft/{alpha}-{seed}", row=lambda wildcards: f"{WISEFT_ROW_PREFIX}{wildcards['alpha']}",
    prefixed=True,
))
_register(RunKind(
    "sepo", "SePO, DPO runs selecting tokens by the per-token rewards of an oracle DPO run of their own (Yang et al., "
            "EMNLP 2025)",
    section="sepo", configured_by="sepo.seeds (on the DPO route; the selection itself: dpo.sepo_ratio, "
                                  "dpo.sepo_rounding)",
    rules=("sepo_subset", "sepo_oracle", "sepo_scores", "train_sepo", "evaluate_sepo"), route="dpo",
    runs=lambda config: ([{"sepo_seed": seed} for seed in _section(config, "sepo").get("seeds") or []]
                         if "dpo" in (config.get("routes") or ()) else []),
    seed_wildcard="sepo_seed",
    eval_dir="results/dpo/eval/sepo/{sepo_seed}", run_dir="results/dpo/sepo/train/{sepo_seed}",
    trained_as="sepo",
))


def run_kind(name: str) -> RunKind | None:
    """The kind of run that run name `name` belongs to (`less`, `wiseft_a0.5`, `sepo`), else None."""
    return next((kind for kind in RUN_KINDS.values() if kind.owns(name)), None)


def refused_method(section: str, name: str) -> str | None:
    """Why `name` cannot be an item of `<section>.methods` when it is a run kind's, else None: the end of the
    message after `<section>.methods: ` (the callers add where the list is)."""
    kind = run_kind(name)
    if kind is None:
        return None
    return f"{name!r} is not a run of the {section} matrix: {kind.refusal()}"


def extra_runs(config: Mapping, route: str) -> list[ExtraRun]:
    """Every extra row of the report of `route` under the merged parameters `config`, kind by kind in
    registry order."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    return [run for kind in RUN_KINDS.values() if kind.route == route for run in kind.extra_runs(config)]

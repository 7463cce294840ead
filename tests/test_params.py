"""Parameters that cannot be nonsense: the config dataclasses refuse non-finite and out-of-range values
naming the field (`ConfigError`), a stage reports every refused value at its own file and line,
settings that would be ignored are refused, and the parameter schema (Snakemake's `validate` of the
merged config, and every stage's `read_section`) accepts every shipped configuration and refuses
typos and bad values. Fast: no model runs; the two stage checks that need a model's depth use a tiny
one built here."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from alphatoken.corpus import write_corpus
from alphatoken.data import ConfigError, DataLimits
from alphatoken.eval.suite import EvalConfig
from alphatoken.fisher import FisherConfig
from alphatoken.models import ModelSpec, build_tiny_model, byte_tokenizer, save_pretrained
from alphatoken.policies import POLICIES, PolicyConfig
from alphatoken.stages import build_corpus, prepare_data
from alphatoken.stages import fisher as fisher_stage
from alphatoken.stages import train as train_stage
from alphatoken.stages.common import SCHEMA_PATH, ParamsError, Section, merge_params, params_schema, read_section, to_config
from alphatoken.train.config import TrainConfig
from alphatoken.valuation import ValuationConfig

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
OVERLAYS = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "experiments").glob("*.yaml"))
SECTIONS = ("model", "corpus", "data", "fisher", "valuation", "train", "eval", "report", "preference_data",
            "warmstart", "dpo", "sepo", "diagnostics", "wiseft")  # the sections a stage reads (routes and resources are read by the rules)


# ---------------------------------------------------------------------------------------------
# The config dataclasses: every float finite and in range, errors naming the field

FLOAT_FIELDS = [  # (dataclass, field, other settings the check needs to be reached)
    (TrainConfig, "lr", {}), (TrainConfig, "weight_decay", {}), (TrainConfig, "adam_eps", {}),
    (TrainConfig, "warmup_ratio", {}), (TrainConfig, "sgd_momentum", {"optimizer": "sgd"}), (TrainConfig, "max_grad_norm", {}), (TrainConfig, "dpo_beta", {}),
    (ValuationConfig, "lam", {}),
    (PolicyConfig, "rho", {}), (PolicyConfig, "rho_end", {"rho_schedule": "linear"}),
    (PolicyConfig, "stm_ppl_threshold", {}), (PolicyConfig, "lora_alpha", {}), (PolicyConfig, "lora_dropout", {}),
    (PolicyConfig, "xtf_iqr_factor", {}), (PolicyConfig, "xtf_novelty_threshold", {}), (PolicyConfig, "sstoken_gamma", {}),
    (PolicyConfig, "talr_tau", {}), (PolicyConfig, "talr_weight_floor", {}), (PolicyConfig, "flow_temperature", {}),
    (PolicyConfig, "tidpo_lambda", {}), (PolicyConfig, "tidpo_prior_sigma_div", {}), (PolicyConfig, "tidpo_alpha", {}),
    (PolicyConfig, "tidpo_gamma", {}), (PolicyConfig, "tidpo_triplet_margin", {}), (PolicyConfig, "tidpo_anchor_temperature", {}),
    (PolicyConfig, "tidpo_anchor_top_p", {}), (PolicyConfig, "sepo_ratio", {}),
    (FisherConfig, "temperature", {}), (FisherConfig, "top_p", {}),
]


def test_every_float_setting_is_checked():
    """The table above covers every float field of the config dataclasses (a new one must join it)."""
    covered = {(cls, name) for cls, name, _ in FLOAT_FIELDS} | {(TrainConfig, "adam_betas")}
    for cls in (TrainConfig, ValuationConfig, PolicyConfig, FisherConfig, DataLimits):
        floats = {(cls, f.name) for f in dataclasses.fields(cls) if "float" in str(f.type)}
        assert floats <= covered, floats - covered


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("cls,name,extra", FLOAT_FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in FLOAT_FIELDS])
def test_non_finite_float_is_refused_naming_its_field(cls, name, extra, value):
    with pytest.raises(ConfigError) as err:
        cls(**extra, **{name: value})
    assert err.value.field == name and "finite" in err.value.message
    assert str(err.value).startswith(f"{cls.__name__}.{name}: expected")


def test_adam_betas_are_finite_and_below_one():
    for betas in [(0.9, math.inf), (math.nan, 0.99), (0.9, 1.0), (0.9,)]:
        with pytest.raises(ConfigError) as err:
            TrainConfig(adam_betas=betas)
        assert err.value.field == "adam_betas"
    assert TrainConfig(adam_betas=[0.9, 0.95]).adam_betas == (0.9, 0.95)  # a YAML list is stored as a tuple


def test_ranges_and_types():
    cases = [
        (ValuationConfig, {"lam": -1.5}, "lam"),  # a negative lambda would reward drift
        (ValuationConfig, {"window": -1}, "window"), (ValuationConfig, {"last_k": 0}, "last_k"),
        (ValuationConfig, {"use_tgt_dir": 1}, "use_tgt_dir"),
        (TrainConfig, {"lr": 0.0}, "lr"), (TrainConfig, {"micro_batch_size": 2.0}, "micro_batch_size"),
        (TrainConfig, {"max_steps": True}, "max_steps"), (TrainConfig, {"bf16": "yes"}, "bf16"),
        (PolicyConfig, {"rho": 1.5}, "rho"), (PolicyConfig, {"stm_ppl_threshold": 0.5}, "stm_ppl_threshold"),
        (PolicyConfig, {"lora_dropout": 1.0}, "lora_dropout"), (PolicyConfig, {"lora_targets": "q_proj"}, "lora_targets"),
        (FisherConfig, {"top_p": 0.0}, "top_p"), (FisherConfig, {"seed": -1}, "seed"),
        (DataLimits, {"on_error": "skip"}, "on_error"), (DataLimits, {"max_examples": -1}, "max_examples"),
    ]
    for cls, kwargs, name in cases:
        with pytest.raises(ConfigError) as err:
            cls(**kwargs)
        assert err.value.field == name, (cls, kwargs)
    assert ValuationConfig(lam=0.0).lam == 0.0 and ValuationConfig(lam=2).lam == 2  # lambda = 0: no proxy


def test_rho_end_needs_a_schedule_and_a_schedule_needs_rho_end():
    with pytest.raises(ConfigError, match="not used by rho_schedule='constant'") as err:
        PolicyConfig(rho=0.5, rho_end=0.2)
    assert err.value.field == "rho_end"
    with pytest.raises(ConfigError, match="needs the final ratio rho_end") as err:
        PolicyConfig(rho_schedule="cosine")
    assert err.value.field == "rho_end"
    assert PolicyConfig(rho=0.5, rho_end=0.2, rho_schedule="linear").rho_at(1.0) == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------
# to_config: the refused value's own file and line


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_dataclass_error_names_the_fields_line_not_the_sections(tmp_path):
    """A value the schema cannot judge alone (rho_end with a constant schedule) is refused by the
    dataclass; the message points at rho_end's line (today: the section's line)."""
    overlay = _write(tmp_path / "o.yaml", "train:\n  rho: 0.5\n\n\n  rho_end: 0.2\n")
    with pytest.raises(ParamsError, match=re.escape(f"{overlay}:5: train.rho_end: 0.2 is not used by rho_schedule")):
        train_stage.read_train_config([PARAMS, overlay], "train", "valuation", "alphatoken", 0, "out")
    # to_config itself, on a hand-made section (no schema in between): ConfigError and EvalConfig's prefix
    section = Section("train", {"micro_batch_size": 0}, {"": "f.yaml:1", "micro_batch_size": "f.yaml:7"})
    with pytest.raises(ParamsError, match=re.escape("f.yaml:7: train.micro_batch_size: expected an integer >= 1, got 0")):
        to_config(section, TrainConfig)
    section = Section("eval", {"timeout_s": math.inf}, {"": "f.yaml:3", "timeout_s": "f.yaml:9"})
    with pytest.raises(ParamsError, match=re.escape("f.yaml:9: eval.timeout_s: expected a finite number > 0, got inf")):
        to_config(section, EvalConfig)


def test_a_value_the_stage_sets_itself_is_refused():
    section = Section("train", {"seed": 3}, {"": "f.yaml:1", "seed": "f.yaml:4"})
    with pytest.raises(ParamsError, match=re.escape("f.yaml:4: train.seed: not a parameter: the stage sets TrainConfig.seed")):
        to_config(section, TrainConfig, seed=0)


def test_tuple_settings_from_yaml_lists(tmp_path):
    overlay = _write(tmp_path / "o.yaml", "train:\n  adam_betas: [0.9, 0.95]\n  lora_targets: [q_proj, v_proj]\n")
    _, config = train_stage.read_train_config([PARAMS, overlay], "train", "valuation", "lora", 0, "out")
    assert config.adam_betas == (0.9, 0.95) and config.policy.lora_targets == ("q_proj", "v_proj")


def test_epochs_with_max_steps_is_refused(tmp_path):
    overlay = _write(tmp_path / "o.yaml", "train:\n  epochs: 3\n")  # params.yaml sets max_steps: 12
    with pytest.raises(ParamsError, match=re.escape(f"{overlay}:2: train.epochs: 3 is not used while train.max_steps=12")):
        train_stage.read_train_config([PARAMS, overlay], "train", "valuation", "full", 0, "out")
    overlay.write_text("train:\n  epochs: 3\n  max_steps: null\n")
    assert train_stage.read_train_config([PARAMS, overlay], "train", "valuation", "full", 0, "out")[1].epochs == 3


def test_a_key_given_twice_in_a_parameter_file_is_refused(tmp_path):
    overlay = _write(tmp_path / "o.yaml", "train:\n  lr: 0.01\n  rho: 0.5\n  lr: 0.02\n")
    with pytest.raises(ParamsError, match=re.escape(f"{overlay}:4: train.lr: given twice (first at {overlay}:2)")):
        read_section([PARAMS, overlay], "train")


# ---------------------------------------------------------------------------------------------
# The schema: shipped configurations pass, typos and bad values fail in both front ends


def _merged(*files: Path) -> dict:
    merged: dict = {}
    for f in files:
        merged = merge_params(merged, yaml.safe_load(f.read_text()) or {})
    return merged


@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=["params.yaml", *[o.stem for o in OVERLAYS]])
def test_shipped_configurations_pass_the_schema(overlay):
    files = [PARAMS] + ([overlay] if overlay else [])
    config = _merged(*files)
    before = copy.deepcopy(config)
    validate(config, str(SCHEMA_PATH))  # what the Snakefile runs (set_default=True: the schema has no defaults)
    assert config == before
    for name in SECTIONS:
        read_section(files, name)


def _no_defaults(node) -> bool:
    if isinstance(node, dict):
        return "default" not in node and all(_no_defaults(v) for v in node.values())
    return all(_no_defaults(v) for v in node) if isinstance(node, list) else True


def test_schema_writes_no_defaults_into_the_config():
    assert _no_defaults(params_schema())


# (overlay text, the section a stage reads or None for the rules' own sections, message of the stage)
BAD_OVERLAYS = [
    ("train:\n  lrr: 0.1\n", "train", ":2: train.lrr: unknown field(s) ['lrr']"),
    ("valuaton:\n  lam: 1.0\n", "valuation", ":1: valuaton: unknown section(s) ['valuaton']"),
    ("train:\n  lr: .inf\n", "train", ":2: train.lr: expected a finite number > 0, got inf"),
    ("train:\n  lr: .nan\n", "train", ":2: train.lr: expected a finite number > 0, got nan"),
    ("train:\n  max_grad_norm: .inf\n", "train", ":2: train.max_grad_norm: expected null or a finite number > 0, got inf"),
    ("dpo:\n  dpo_beta: .inf\n", "dpo", ":2: dpo.dpo_beta: expected a finite number > 0, got inf"),
    ("train:\n  dpo_beta: 0.2\n", "train", ":2: train.dpo_beta: unknown field(s) ['dpo_beta']"),  # SFT: unused
    ("warmstart:\n  methods: [full]\n", "warmstart", ":2: warmstart.methods: unknown field(s) ['methods']"),
    ("valuation:\n  lam: -1.5\n", "valuation", ":2: valuation.lam: expected a finite number >= 0, got -1.5"),
    ("valuation:\n  window: 2.5\n", "valuation", ":2: valuation.window: expected an integer >= 0, got 2.5"),
    ("fisher:\n  top_p: 1.5\n", "fisher", ":2: fisher.top_p: expected a finite number in (0, 1], got 1.5"),
    ("train:\n  methods: [alphatoken, Alpha-Token]\n", "train", ":2: train.methods[1]: expected a string matching"),
    ("train:\n  adam_betas: [0.9, 1.0]\n", "train", ":2: train.adam_betas[1]: expected a finite number in [0, 1), got 1.0"),
    ("data:\n  on_error: ignore\n", "data", ":2: data.on_error: expected one of ['raise', 'drop'], got 'ignore'"),
    ("model:\n  tiny: {arch: llama, dtype: float64}\n", "model", ":2: model.tiny.dtype: unknown field(s) ['dtype']"),
    ("eval:\n  timeout_s: .inf\n", "eval", ":2: eval.timeout_s: expected a finite number > 0, got inf"),
    ("corpus:\n  sft_dataset: magicodr\n", "corpus", ":2: corpus.sft_dataset: expected one of ['', 'magicoder'"),
    ("resources:\n  trian: {threads: 1}\n", None, None),
    ("resources:\n  train: {thread: 1}\n", None, None),
    ("routes: [sft, rl]\n", None, None),
    ("wiseft:\n  alphas: [0.5, 1.5]\n", "wiseft", ":2: wiseft.alphas[1]: expected a finite number in [0, 1], got 1.5"),
    ("wiseft:\n  alphas: [0.5, 0.5]\n", "wiseft", ":2: wiseft.alphas: expected a list"),
]


@pytest.mark.parametrize("text,section,message", BAD_OVERLAYS, ids=[b[0].strip().replace("\n", " ") for b in BAD_OVERLAYS])
def test_bad_value_fails_in_snakemake_and_in_the_stage(tmp_path, text, section, message):
    overlay = _write(tmp_path / "overlay.yaml", text)
    config = _merged(PARAMS, overlay)
    with pytest.raises(WorkflowError, match="Error validating config file"):
        validate(config, str(SCHEMA_PATH))
    if section is not None:  # the DVC front end: the stage reading the section
        with pytest.raises(ParamsError) as err:
            read_section([PARAMS, overlay], section)
        assert f"{overlay}{message}" in str(err.value)


def _schema_keys(section: str) -> set:
    return set(params_schema()["properties"][section]["properties"])


def test_schema_lists_exactly_the_keys_the_stages_read():
    """Each section's block names the keys its stage accepts, no more (a key in the schema that the
    stage refuses would pass Snakemake and fail a job) and no fewer (a valid setting refused)."""
    from alphatoken.stages import fisher as fisher_module
    from alphatoken.stages import prepare_data as data_module
    from alphatoken.stages.build_corpus import HUB_KEYS
    from alphatoken.stages.train import MATRIX_KEYS, OWN_KEYS, POLICY_KEYS, VARIANTS_KEY

    stage_set = {"output_dir", "seed", "policy", "valuation"}  # TrainConfig fields the train stage decides
    run = ({f.name for f in dataclasses.fields(TrainConfig)} - stage_set - {"dpo_beta"}) | set(POLICY_KEYS) | set(OWN_KEYS)
    assert _schema_keys("train") == run | set(MATRIX_KEYS) | {VARIANTS_KEY}
    assert _schema_keys("dpo") == run | set(MATRIX_KEYS) | {VARIANTS_KEY, "dpo_beta"}
    assert _schema_keys("warmstart") == run  # one run of policy `full`: no method list
    assert _schema_keys("valuation") == {f.name for f in dataclasses.fields(ValuationConfig)}
    assert _schema_keys("fisher") == {f.name for f in dataclasses.fields(FisherConfig)} | set(fisher_module.OWN_KEYS)
    splits = set(data_module.OWN_KEYS) | set(data_module.OPTIONAL_KEYS) | {f.name for f in dataclasses.fields(DataLimits)}
    assert _schema_keys("data") == _schema_keys("preference_data") == splits
    corpus = set(inspect.signature(write_corpus).parameters) - {"out_dir", "problems"}
    assert _schema_keys("corpus") == corpus | set(HUB_KEYS)
    assert _schema_keys("model") == {f.name for f in dataclasses.fields(ModelSpec)}
    assert set(inspect.signature(build_tiny_model).parameters) - {"dtype", "attn_implementation"} == \
        set(params_schema()["properties"]["model"]["properties"]["tiny"]["properties"])
    assert _schema_keys("eval") <= {f.name for f in dataclasses.fields(EvalConfig)}  # open block: no stale key
    from alphatoken.eval.diagnostics import DiagnosticsConfig

    assert _schema_keys("diagnostics") == {f.name for f in dataclasses.fields(DiagnosticsConfig)} | {"run"}
    from alphatoken.stages import wiseft as wiseft_module

    assert _schema_keys("wiseft") == set(wiseft_module.OWN_KEYS) | set(wiseft_module.MATRIX_KEYS)
    pattern = params_schema()["properties"]["train"]["properties"]["methods"]["items"]["pattern"]
    assert all(re.fullmatch(pattern, name) for name in POLICIES)  # every policy can be listed as a method


# ---------------------------------------------------------------------------------------------
# Stage checks: before any work, and against the loaded model


def test_train_stage_refuses_an_infinite_lr_before_loading_anything(tmp_path, capsys):
    overlay = _write(tmp_path / "o.yaml", "train:\n  lr: .inf\n")
    argv = ["--params", str(PARAMS), str(overlay), "--section", "train", "--valuation-section", "valuation",
            "--objective", "sft", "--method", "full", "--model", str(tmp_path / "absent"), "--train-data", "t",
            "--val-data", "v", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        train_stage.main(argv)
    assert exit_info.value.code == 2
    assert f"error: {overlay}:2: train.lr: expected a finite number > 0, got inf" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    return build_tiny_model("llama", dtype=torch.float32)  # 4 decoder blocks


def test_last_k_beyond_the_models_depth_names_the_field_and_the_depth(tmp_path, tiny_llama):
    overlay = _write(tmp_path / "o.yaml", "valuation:\n  last_k: 5\n")
    _, config = train_stage.read_train_config([PARAMS, overlay], "train", "valuation", "alphatoken", 0, "out")
    with pytest.raises(ParamsError, match=re.escape(f"{overlay}:2: valuation.last_k: 5 is more than the 4 decoder "
                                                    "blocks of the model; set it to at most 4")):
        train_stage.check_against_model(tiny_llama, config, [PARAMS, overlay], "train", "valuation", scores=True)
    train_stage.check_against_model(tiny_llama, config, [PARAMS, overlay], "train", "valuation", scores=False)  # unused
    overlay.write_text("valuation:\n  last_k: 2\nfisher:\n  last_k: 6\n")  # a run computing its own (LoRA) Fisher
    _, config = train_stage.read_train_config([PARAMS, overlay], "train", "valuation", "alphatoken_lora", 0, "out")
    with pytest.raises(ParamsError, match=re.escape(f"{overlay}:4: fisher.last_k: 6 is more than the 4 decoder")):
        train_stage.check_against_model(tiny_llama, config, [PARAMS, overlay], "train", "valuation", True, "fisher")


def test_window_past_max_length_is_warned_about(tmp_path, tiny_llama, capsys):
    overlay = _write(tmp_path / "o.yaml", "valuation:\n  last_k: 2\n  window: 300\n")  # train.max_length: 256
    _, config = train_stage.read_train_config([PARAMS, overlay], "train", "valuation", "alphatoken", 0, "out")
    train_stage.check_against_model(tiny_llama, config, [PARAMS, overlay], "train", "valuation", scores=True)
    assert (f"warning: {overlay}:3: valuation.window: 300 >= train.max_length=256: the value path of a token stops "
            "at the sequence end, so this run uses window 255") in capsys.readouterr().err
    overlay.write_text("valuation:\n  last_k: 2\n  window: 255\n")
    _, config = train_stage.read_train_config([PARAMS, overlay], "train", "valuation", "alphatoken", 0, "out")
    train_stage.check_against_model(tiny_llama, config, [PARAMS, overlay], "train", "valuation", scores=True)
    assert "warning" not in capsys.readouterr().err


def test_fisher_stage_refuses_last_k_beyond_the_models_depth(tmp_path, tiny_llama, capsys):
    model_dir = save_pretrained(tiny_llama, byte_tokenizer(), tmp_path / "model")
    overlay = _write(tmp_path / "o.yaml", "fisher:\n  last_k: 5\n  attn_implementation: eager\n")
    argv = ["--params", str(PARAMS), str(overlay), "--section", "fisher", "--model", str(model_dir),
            "--prompts", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "f.safetensors"),
            "--summary", str(tmp_path / "f.json")]
    with pytest.raises(SystemExit) as exit_info:
        fisher_stage.main(argv)
    assert exit_info.value.code == 2
    assert (f"error: {overlay}:2: fisher.last_k: 5 is more than the 4 decoder blocks of the model; "
            "set it to at most 4") in capsys.readouterr().err


def test_corpus_settings_that_would_be_ignored_are_refused(tmp_path, capsys):
    for text, message in [
        ("corpus:\n  preference_local_path: /data/uf.jsonl\n", ":2: corpus.preference_local_path: a local copy is read"),
        ("corpus:\n  max_examples: 100\n", ":2: corpus.max_examples: 100 limits the rows of a hub dataset, and none"),
    ]:
        overlay = _write(tmp_path / "o.yaml", text)
        with pytest.raises(SystemExit):
            build_corpus.main(["--params", str(PARAMS), str(overlay), "--section", "corpus", "--out", str(tmp_path / "c")])
        assert f"error: {overlay}{message}" in capsys.readouterr().err


def test_prepare_data_sizes_are_checked_by_the_schema(tmp_path, capsys):
    overlay = _write(tmp_path / "o.yaml", "data:\n  n_test: -1\n")
    with pytest.raises(SystemExit):
        prepare_data.main(["--params", str(PARAMS), str(overlay), "--section", "data", "--corpus", "c.jsonl",
                           "--out", str(tmp_path / "d")])
    assert f"error: {overlay}:2: data.n_test: expected an integer >= 0, got -1" in capsys.readouterr().err


def test_a_misspelt_method_fails_in_snakemake_and_in_the_stage(tmp_path):
    """A method name is a token policy or a variant of the section, which the schema cannot tell
    apart: the rules refuse it before any job, the stage when it reads its run."""
    import subprocess
    import sys

    from alphatoken.stages.train import read_train_config

    repo = Path(__file__).resolve().parents[1]
    overlay = _write(tmp_path / "overlay.yaml", "train:\n  methods: [alphatoken, alphatokn]\n")
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    result = subprocess.run([snakemake, "-n", "--configfile", str(overlay)], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "train.methods: ['alphatokn'] are neither token policies" in result.stdout + result.stderr
    with pytest.raises(ParamsError, match=f"{overlay}:2: train.methods: 'alphatokn' is neither a token policy"):
        read_train_config([PARAMS, overlay], "train", "valuation", "alphatokn", 0, "out")

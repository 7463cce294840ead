"""What every stage shares: its command line, reading one parameter section with the file and line
of every value (so a bad value is reported as `params.yaml:42: fisher.temperature: ...`), checking it
against the pipeline's parameter schema (`workflow/schemas/config.schema.yaml`, the one Snakemake
validates the whole config with), turning it into a frozen config dataclass, and logging where it runs
(device, SLURM GPU binding).

Parameter files are layered like Snakemake's `configfile:` + `--configfile`: later files override
earlier ones key by key (nested mappings are merged, everything else is replaced).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import logging
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml

# What the fisher section holds besides FisherConfig (how the model is loaded and the prompts encoded);
# read by the fisher stage and by the train stage when it computes the Fisher itself.
FISHER_STAGE_KEYS = ("dtype", "attn_implementation", "max_length")

# Environment variables that show which accelerators a scheduler bound to the job.
DEVICE_ENV_VARS = (
    "CUDA_VISIBLE_DEVICES",
    "SLURM_JOB_ID",
    "SLURM_JOB_GPUS",
    "SLURM_GPUS",
    "SLURM_GPUS_ON_NODE",
    "SLURM_STEP_GPUS",
    "SLURM_CPUS_PER_TASK",
)


LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's safe loader when PyYAML has it (same result, faster)
# The schema of every parameter section; Snakemake validates the merged config against it too.
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ParamsError(ValueError):
    """A parameter value that cannot be used; the message names file, line and field."""


@dataclasses.dataclass(frozen=True)
class Section:
    """One section of the layered parameter files."""

    name: str  # the section key, e.g. "fisher"
    values: dict  # the merged values of the section
    where: dict  # dotted field path ("tiny.arch") -> "file:line" of the value that won

    def locate(self, field: str) -> str:
        """`file:line: section.field` for messages (the section's own line when the field is absent)."""
        loc = self.where.get(field) or self.where.get("", "?")
        return f"{loc}: {self.name}.{field}" if field else f"{loc}: {self.name}"


def _node_lines(node: yaml.Node, path: str, filename: str, out: dict) -> None:
    """Record `file:line` of every mapping key below `node`, by dotted path. A key given twice in one
    mapping is an error: YAML loaders keep the last one silently."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = f"{path}.{key_node.value}" if path else str(key_node.value)
            if child in out:
                raise ParamsError(f"{filename}:{key_node.start_mark.line + 1}: {child}: given twice (first at "
                                  f"{out[child]}); YAML would keep the last silently")
            out[child] = f"{filename}:{key_node.start_mark.line + 1}"
            _node_lines(value_node, child, filename, out)


def merge_params(base: dict, over: dict) -> dict:
    """Snakemake's config layering: nested mappings merge, other values are replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_params(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_section(files: list[str | Path], name: str) -> Section:
    """Merge the parameter `files` in order and return section `name` with the origin of each value."""
    values: dict = {}
    where: dict = {}
    for file in files:
        text = Path(file).read_text()
        try:
            node = yaml.compose(text, Loader=LOADER)
            data = yaml.load(text, Loader=LOADER) or {}
        except yaml.YAMLError as err:
            raise ParamsError(f"{file}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ParamsError(f"{file}:1: expected a mapping of sections, got {type(data).__name__}")
        lines: dict = {}
        if node is not None:
            _node_lines(node, "", str(file), lines)
        values = merge_params(values, data)
        where.update(lines)
    if name not in values:
        raise ParamsError(f"{', '.join(map(str, files))}: no section {name!r} (sections: {sorted(values)})")
    section = values[name]
    if not isinstance(section, dict):
        raise ParamsError(f"{where.get(name, files[-1])}: {name}: expected a mapping, got {section!r}")
    problems = schema_problems(values, name, where)
    if problems:
        raise ParamsError("\n".join(problems))
    prefix = name + "."
    local = {key[len(prefix):]: loc for key, loc in where.items() if key.startswith(prefix)}
    local[""] = where.get(name, str(files[-1]))
    return Section(name=name, values=section, where=local)


@functools.lru_cache(maxsize=1)
def params_schema() -> dict:
    """The pipeline's parameter schema (YAML anchors resolved), read once."""
    if not SCHEMA_PATH.is_file():
        raise ParamsError(f"{SCHEMA_PATH}: the parameter schema is missing (the stages run from a checkout of the "
                          "repository, which has workflow/schemas/)")
    return yaml.safe_load(SCHEMA_PATH.read_text())


def schema_problems(values: dict, name: str, where: dict) -> list[str]:
    """`file:line: section.field: ...` for every value of section `name` (and every unknown section
    name) the schema refuses, ordered by file and line; empty when all is well. `values` are the merged
    sections, `where` maps dotted paths to `file:line`. Only that one section is checked: a stage
    answers for its own parameters (Snakemake checks them all)."""
    from jsonschema import Draft202012Validator

    schema = params_schema()
    known = schema.get("properties", {})
    # the section, and the names the schema does not know (a misspelt section is never read by anyone)
    instance = {key: value for key, value in values.items() if key == name or key not in known}
    root = {key: value for key, value in schema.items() if key != "required"}  # the other sections may be absent
    found: dict[tuple, str] = {}
    for error in Draft202012Validator(root).iter_errors(instance):
        path = tuple(error.absolute_path)
        if error.validator == "additionalProperties":  # at the first unknown key's line, naming them all
            allowed = sorted(error.schema.get("properties", {}))
            extras = [key for key in error.instance if key not in allowed]
            what = "unknown section(s)" if not path else "unknown field(s)"
            found.setdefault(path + (extras[0],), f"{what} {extras}; expected some of {allowed}")
        elif error.validator == "required":
            missing = [key for key in error.validator_value if key not in error.instance]
            found.setdefault(path, f"missing required field(s) {missing}")
        else:  # type, range, enum, finiteness: one message per value, from its schema
            found.setdefault(path, f"expected {describe_schema(_schema_at(schema, path))}, got {error.instance!r}")

    def location(path: tuple) -> tuple[str, str]:
        dotted = ".".join(str(p) for p in path if not isinstance(p, int))  # list items: the list's line
        shown = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))
        return where.get(dotted) or where.get(name, "?"), shown

    def order(item):
        loc = location(item[0])[0]
        file, _, line = loc.rpartition(":")
        return (file, int(line) if line.isdigit() else 0, item[0])

    problems = []
    for path, message in sorted(found.items(), key=order):
        loc, shown = location(path)
        problems.append(f"{loc}: {shown}: {message}")
    return problems


def _schema_at(schema: dict, path: tuple) -> dict:
    """The sub-schema that describes the value at `path` (keys of mappings, indices of lists)."""
    node = schema
    for step in path:
        if isinstance(step, int):
            node = node.get("items", {})
        else:
            extra = node.get("additionalProperties")
            node = node.get("properties", {}).get(step, extra if isinstance(extra, dict) else {})
    return node


def describe_schema(schema: dict) -> str:
    """What a schema accepts, in words: `an integer >= 1`, `null or a finite number in (0, 1]`,
    `one of ['cosine', 'constant']`, `a non-empty list of ...`."""
    from alphatoken.data import interval_text  # the config dataclasses' own wording of a range

    if "enum" in schema:
        return f"one of {schema['enum']}"
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    words = ["null"] if "null" in kinds else []
    for kind in kinds:
        if kind in ("integer", "number"):
            low = schema.get("exclusiveMinimum", schema.get("minimum"))
            high = schema.get("exclusiveMaximum", schema.get("maximum"))
            bounds = interval_text(low, high, "exclusiveMinimum" in schema, "exclusiveMaximum" in schema)
            words.append(("an integer" if kind == "integer" else "a finite number") + (f" {bounds}" if bounds else ""))
        elif kind == "array":
            low, high = schema.get("minItems", 0), schema.get("maxItems")
            head = f"a list of {low} items" if low and high == low else ("a non-empty list" if low else "a list")
            items = schema.get("items")
            words.append(head + (f", each {describe_schema(items)}" if items else ""))
        elif kind == "string" and "pattern" in schema:
            words.append(f"a string matching {schema['pattern']}")
        elif kind != "null":
            words.append({"string": "a string", "boolean": "true or false", "object": "a mapping"}.get(kind, kind))
    return " or ".join(words) or "a valid value"


def _check_type(section: Section, field: str, value: Any, default: Any) -> None:
    """A value must have the type of the field's default (ints are accepted where floats are, YAML
    lists where tuples are)."""
    if default is None or value is None:
        return
    expected = type(default)
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if expected is tuple and isinstance(value, list):
        ok = True
    if not ok:
        raise ParamsError(
            f"{section.locate(field)}: expected {expected.__name__} (like the default {default!r}), "
            f"got {type(value).__name__} {value!r}"
        )


def to_config(section: Section, cls: type, **overrides: Any):
    """Build the frozen dataclass `cls` from a section: unknown keys, missing required fields and
    values of the wrong type are errors naming file, line and field. `overrides` (paths decided by
    the pipeline rather than the parameters) win over section values."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(section.values) - set(fields))
    if unknown:
        raise ParamsError(
            f"{section.locate(unknown[0])}: unknown field(s) {unknown} for {cls.__name__}; "
            f"expected some of {sorted(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in overrides:
            if name in section.values:  # the stage decides it: the value here would be ignored
                raise ParamsError(f"{section.locate(name)}: not a parameter: the stage sets {cls.__name__}.{name} "
                                  f"itself (here to {overrides[name]!r}); remove it from the section")
            kwargs[name] = overrides[name]
            continue
        if name not in section.values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{section.locate('')}: missing required field {section.name}.{name}")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        _check_type(section, name, section.values[name], default)
        value = section.values[name]
        kwargs[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # the dataclass's own __post_init__ validation
        # alphatoken.data.ConfigError names its field (`err.field`); other dataclasses name it as the
        # message's `Class.field:` prefix. Either way the error points at that value's own line.
        field, message = getattr(err, "field", None), getattr(err, "message", None)
        if field is None:
            named = re.match(rf"{cls.__name__}\.(\w+):\s*(.*)", str(err), re.S)
            field, message = named.groups() if named else ("", None)
        if field not in fields:
            raise ParamsError(f"{section.locate('')}: invalid {cls.__name__}: {err}") from err
        raise ParamsError(f"{section.locate(field)}: {message}") from err


def to_kwargs(section: Section, fn, exclude: tuple = ()) -> dict:
    """Keyword arguments of `fn` from a section, checked like `to_config` against the defaults of
    its signature; parameters in `exclude` are decided by the stage (paths), not by the section."""
    params = {n: p for n, p in inspect.signature(fn).parameters.items()
              if n not in exclude and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(section.values) - set(params))
    if unknown:
        raise ParamsError(f"{section.locate(unknown[0])}: unknown field(s) {unknown} for {fn.__name__}(); "
                          f"expected some of {sorted(params)}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in section.values]
    if missing:
        raise ParamsError(f"{section.locate('')}: missing required field(s) {missing} of {section.name}")
    for name, value in section.values.items():
        _check_type(section, name, value, params[name].default if params[name].default is not params[name].empty else None)
    return dict(section.values)


def split_section(section: Section, keys: tuple) -> tuple[dict, Section]:
    """Take the stage's own `keys` (e.g. a dtype) out of a section; the rest configures the library."""
    own = {k: section.values[k] for k in keys if k in section.values}
    rest = {k: v for k, v in section.values.items() if k not in keys}
    return own, dataclasses.replace(section, values=rest)


def stage_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every stage takes: the parameter files and its section."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", nargs="+", default=["params.yaml"],
                        help="parameter files, later ones override earlier ones (default: params.yaml)")
    parser.add_argument("--section", required=True, help="the section of the parameter files this stage reads")
    return parser


def pick_device() -> str:
    """`cuda` when a usable GPU is visible, else `cpu` (the same code runs on both)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_threads(files: list[str | Path], rule: str) -> int:
    """The CPU threads of `rule` (`resources.<rule>.threads` in the parameter files, default 1)."""
    merged: dict = {}
    for file in files:
        merged = merge_params(merged, yaml.safe_load(Path(file).read_text()) or {})
    return int(((merged.get("resources") or {}).get(rule) or {}).get("threads", 1))


def log_run_environment(stage: str, device: str, params: list[str | Path] | None = None) -> dict:
    """Print (to the stage log) where the stage runs: host, device, and the scheduler's GPU binding.

    With the parameter files, also fix torch's CPU thread count to the rule's `threads`: the order
    of floating-point reductions on CPU depends on it, so Snakemake (which exports the rule's
    threads) and DVC (which does not) would otherwise write different bytes for the same result."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")  # library progress notes
    env = {name: os.environ.get(name, "") for name in DEVICE_ENV_VARS}
    info = {"stage": stage, "host": platform.node(), "python": sys.executable, "device": device, **env}
    if params is not None:
        import torch

        info["threads"] = cpu_threads(params, stage)
        torch.set_num_threads(info["threads"])
    for key, value in info.items():
        print(f"[run] {key}={value}", file=sys.stderr, flush=True)
    return info


def write_json(path: str | Path, payload: dict) -> None:
    """Write a small JSON artifact (sorted keys, trailing newline) creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def fail(message: str) -> NoReturn:
    """Exit with a one-line error a person can act on (Snakemake then names the rule and its log)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def gpus_requested(files: list[str | Path], rule: str) -> int:
    """GPUs of `rule` (`resources.<rule>.gpu` in the parameter files, default 0)."""
    merged: dict = {}
    for file in files:
        merged = merge_params(merged, yaml.safe_load(Path(file).read_text()) or {})
    return int(((merged.get("resources") or {}).get(rule) or {}).get("gpu", 0) or 0)


def relaunch_under_torchrun(module: str, argv: list[str], gpus: int) -> None:
    """Run `python -m module argv` as `gpus` processes under torchrun, inside this one job, and
    exit with its status. A job scheduler starts one task per job (one process); torchrun starts
    the per-GPU workers, which see WORLD_SIZE/LOCAL_RANK and do not relaunch."""
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", f"--nproc_per_node={gpus}", "-m", module, *argv]
    print(f"[run] launching {gpus} processes: {' '.join(cmd)}", file=sys.stderr, flush=True)
    raise SystemExit(subprocess.call(cmd))


def init_distributed() -> tuple[int, int, str]:
    """(rank, world size, device) of this process: a torchrun worker joins the process group
    (NCCL on GPUs, gloo on CPU) and takes GPU LOCAL_RANK; a single process runs on the best device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device()
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), world, f"cuda:{local_rank}"
    dist.init_process_group("gloo")
    return dist.get_rank(), world, "cpu"

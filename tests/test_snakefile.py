"""Snakemake conventions of the Snakefile: it states the Snakemake it needs (the pin of pyproject.toml) and
validates the merged config against the schema the stages check their section with, before any rule."""

import ast
import re
import tomllib
from pathlib import Path

from alphatoken.stages.common import SCHEMA_PATH

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"


def top_calls(text):
    """{function name: first positional argument} of the module-level calls of Snakefile text, in order
    (Snakemake directives such as `configfile:` are not Python; the lines of the calls are)."""
    calls = []
    for line in text.splitlines():
        match = re.match(r"(min_version|validate)\((.*)\)\s*(#.*)?$", line)
        if match:
            calls.append((match.group(1), ast.literal_eval(match.group(2).split(",")[-1].strip())))
    return calls


def test_snakefile_requires_the_pinned_snakemake():
    text = SNAKEFILE.read_text()
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [p.split("==")[1] for p in pins if p.startswith("snakemake==")]
    calls = top_calls(text)
    assert calls and calls[0][0] == "min_version", calls
    assert tuple(int(x) for x in pin.split(".")) >= tuple(int(x) for x in calls[0][1].split("."))
    assert pin.startswith(calls[0][1]), (pin, calls[0][1])


def test_snakefile_validates_with_the_stage_schema_before_any_include():
    text = SNAKEFILE.read_text()
    calls = dict(top_calls(text))
    assert (SNAKEFILE.parent / calls["validate"]).resolve() == SCHEMA_PATH.resolve()
    assert text.index("validate(config") < text.index("include:"), "the config is validated before the rules read it"
    assert text.index('configfile: "params.yaml"') < text.index("validate(config")


def test_top_calls_sees_a_wrong_schema():
    calls = dict(top_calls('min_version("9.1")\nvalidate(config, "other.schema.yaml")\n'))
    assert calls == {"min_version": "9.1", "validate": "other.schema.yaml"}
    assert (SNAKEFILE.parent / calls["validate"]).resolve() != SCHEMA_PATH.resolve()


SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|\[.*\]\s*=|\s*[+]?=)")


def test_rules_do_not_edit_sys_path_at_parse_time():
    files = [SNAKEFILE, *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    edits = [f"{f.relative_to(REPO)}:{n}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
             if SYS_PATH_EDIT.search(line.split("#")[0])]
    assert not edits, f"sys.path changed at parse time: {edits}"


def test_sys_path_check_can_fail():
    assert SYS_PATH_EDIT.search('sys.path.insert(0, "x")') and SYS_PATH_EDIT.search("sys.path += ['x']")
    assert not SYS_PATH_EDIT.search("print(sys.path)")

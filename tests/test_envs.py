"""The conda environment of the Snakemake rules (workflow/envs/alphatoken.yaml) pins what the venv of
`make setup` installs: pyproject.toml's runtime dependencies and the Makefile's --no-deps packages."""

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# Front ends that run the stages; a stage never imports them, so the stage environment leaves them out.
FRONT_ENDS = {"snakemake", "snakemake-executor-plugin-slurm", "dvc"}


def parse_pins(requirements, where):
    """{name: version} of `name==version` requirements; anything else is an error naming `where`."""
    pins = {}
    for req in requirements:
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", req.strip())
        if not match:
            raise ValueError(f"{where}: {req!r} is not pinned as name==version")
        pins[match.group(1).lower()] = match.group(2)
    return pins


def pyproject_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return parse_pins(project["dependencies"], "pyproject.toml [project] dependencies")


def makefile_pins():
    """The packages `make setup` installs with `pip install ... --no-deps NAME==VERSION`."""
    lines = [ln for ln in (REPO / "Makefile").read_text().splitlines() if "pip install" in ln and "--no-deps" in ln]
    return parse_pins([ln.split()[-1] for ln in lines], "Makefile (pip install --no-deps)")


def env_pins(path=REPO / "workflow/envs/alphatoken.yaml"):
    deps = yaml.safe_load(path.read_text())["dependencies"]
    pip = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    if len(pip) != 1:
        raise ValueError(f"{path}: expected one `pip:` list under dependencies, found {len(pip)}")
    return parse_pins(pip[0], f"{path} dependencies.pip")


def test_env_pins_what_the_venv_installs():
    expected = {n: v for n, v in pyproject_pins().items() if n not in FRONT_ENDS} | makefile_pins()
    got = env_pins()
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    differ = sorted(f"{n}: env {got[n]} vs {expected[n]}" for n in set(got) & set(expected) if got[n] != expected[n])
    assert not (missing or extra or differ), f"missing {missing}, not installed by make setup {extra}, pins {differ}"


def test_env_python_satisfies_requires_python():
    deps = yaml.safe_load((REPO / "workflow/envs/alphatoken.yaml").read_text())["dependencies"]
    python = [d for d in deps if isinstance(d, str) and d.startswith("python=")]
    assert len(python) == 1, deps
    minimum = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert minimum.startswith(">="), minimum
    as_tuple = [tuple(int(x) for x in v.split(".")) for v in (python[0].split("=")[1], minimum[2:])]
    assert as_tuple[0] >= as_tuple[1], (python[0], minimum)


def test_pin_check_can_fail(tmp_path):
    """The checker sees a wrong pin and an unpinned requirement."""
    env = tmp_path / "env.yaml"
    env.write_text("dependencies:\n  - pip:\n      - torch==0.0.1\n")
    assert env_pins(env) == {"torch": "0.0.1"} != {"torch": pyproject_pins()["torch"]}
    env.write_text("dependencies:\n  - pip:\n      - torch\n")
    try:
        env_pins(env)
    except ValueError as err:
        assert "env.yaml dependencies.pip" in str(err) and "'torch'" in str(err)
    else:
        raise AssertionError("an unpinned requirement was accepted")

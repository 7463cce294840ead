"""The source files a stage really runs: the import closure of `alphatoken.stages.NAME` inside the
`alphatoken` package, found by reading every `import` statement (module level and inside functions)
with `ast`. Both front ends list these files as dependencies, so editing a library module reruns the
stages that import it, not only the stage script.

    python workflow/scripts/stagedeps.py prepare_model     # prints the files, one per line
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "alphatoken"

# Wildcards of the run matrix and the parameter lists they range over. Snakemake expands the
# wildcard rules over them; dvc.yaml declares the same rules as DVC `matrix:` stages over the same
# parameters, so `dvc exp run -S 'train.methods=[...]'` changes the runs in both front ends.
MATRIX = {
    "method": ("train", "methods"), "seed": ("train", "seeds"),  # SFT route
    "dpo_method": ("dpo", "methods"), "dpo_seed": ("dpo", "seeds"),  # DPO route
    "less_seed": ("less", "seeds"),  # LESS runs (less.enabled), trained on its selection
    "sepo_seed": ("sepo", "seeds"),  # SePO on the DPO route (its own rules: workflow/rules/dpo.smk)
    "alpha": ("wiseft", "alphas"),  # Wise-FT merges (x seed), workflow/rules/wiseft.smk
}


def module_file(module: str, root: Path) -> Path | None:
    """`a.b` -> root/a/b.py or root/a/b/__init__.py (None when it is not a source file of the repo)."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    """Every module an `import` / `from ... import` in `path` may load (names that turn out to be
    attributes rather than submodules are filtered later by `module_file`)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the importing package
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _with_parents(module: str) -> list[str]:
    """Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_closure(module: str, root: Path) -> list[str]:
    """Repo-relative paths (sorted) of all `alphatoken` source files that importing `module` runs."""
    root = Path(root)
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        for candidate in _with_parents(name):
            if candidate in seen or candidate.split(".")[0] != PACKAGE:
                continue
            path = module_file(candidate, root)
            if path is None:
                continue  # an attribute imported with `from pkg import name`, or not in the repo
            seen.add(candidate)
            files.add(path)
            todo.extend(_imported_modules(path, candidate))
    return sorted(str(p.relative_to(root)) for p in files)


def stage_sources(stage: str, root: Path) -> list[str]:
    """The files stage `stage` runs (its entry point `alphatoken.stages.<stage>` and everything it imports)."""
    module = f"{PACKAGE}.stages.{stage}"
    if module_file(module, Path(root)) is None:
        raise FileNotFoundError(f"no stage entry point {module} (expected {PACKAGE}/stages/{stage}.py)")
    return import_closure(module, Path(root))


if __name__ == "__main__":
    repo = Path(__file__).resolve().parents[2]
    for name in sys.argv[1:]:
        print("\n".join(stage_sources(name, repo)))

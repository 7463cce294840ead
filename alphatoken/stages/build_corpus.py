"""Stage build_corpus: the offline target corpus (instruction -> code pairs from the running
Python's standard library, decontaminated against HumanEval) and its preference pairs.

    python -m alphatoken.stages.build_corpus --params params.yaml --section corpus --out results/corpus
"""

from __future__ import annotations

from alphatoken.corpus import write_corpus
from alphatoken.stages.common import ParamsError, fail, log_run_environment, read_section, stage_parser, to_kwargs


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for sft.jsonl, preference.jsonl, manifest.json")
    args = parser.parse_args(argv)
    try:
        kwargs = to_kwargs(read_section(args.params, args.section), write_corpus, exclude=("out_dir", "problems"))
    except ParamsError as err:
        fail(str(err))
    log_run_environment("build_corpus", "cpu")
    try:
        result = write_corpus(args.out, **kwargs)
    except FileNotFoundError as err:
        fail(f"{err} (set {args.section}.stdlib_dir to a directory of Python sources, or leave it empty)")
    counts = result["counts"]
    if counts["sft"] == 0:
        fail(f"the corpus is empty ({counts}); loosen {args.section}.min_doc_chars / max_code_chars")
    print(f"[build_corpus] {counts} -> {args.out}")


if __name__ == "__main__":
    main()

"""Stage prepare_data: draw the target-validation, Fisher and test hold-outs (disjoint by prompt) and
the training pool from a chat corpus (or preference pairs, `--kind preference`), before any training.

    python -m alphatoken.stages.prepare_data --params params.yaml --section data \
        --corpus results/corpus/sft.jsonl --out results/data
"""

from __future__ import annotations

from pathlib import Path

from alphatoken.data import DataError, DataLimits, load_jsonl, make_splits, require_examples, write_splits
from alphatoken.stages.common import (
    ParamsError, fail, log_run_environment, read_section, split_section, stage_parser, to_config, write_json,
)

OWN_KEYS = ("n_val", "n_fisher", "seed")  # make_splits arguments; the rest are DataLimits fields
OPTIONAL_KEYS = {"n_test": 0}  # make_splits arguments with a default (the test hold-out)
DROP_REPORT = "drop_report.json"  # written beside the splits when the stage fails after reading the corpus


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="chat examples or preference pairs (JSONL) to split")
    parser.add_argument("--kind", choices=("chat", "preference"), default="chat", help="what the corpus holds")
    parser.add_argument("--out", required=True, help="directory for train/val/fisher.jsonl and manifest.json")
    args = parser.parse_args(argv)
    try:
        section = read_section(args.params, args.section)
        own, rest = split_section(section, OWN_KEYS + tuple(OPTIONAL_KEYS))
        own = {**OPTIONAL_KEYS, **own}
        missing = [k for k in OWN_KEYS + tuple(OPTIONAL_KEYS)
                   if not isinstance(own.get(k), int) or isinstance(own.get(k), bool) or own[k] < 0]
        if missing:
            raise ParamsError(f"{section.locate(missing[0])}: expected an integer >= 0 (fields {list(OWN_KEYS)} "
                              f"are required, {list(OPTIONAL_KEYS)} optional)")
        limits = to_config(rest, DataLimits)
    except ParamsError as err:
        fail(str(err))
    log_run_environment("prepare_data", "cpu")
    report = Path(args.out) / DROP_REPORT
    try:
        loaded = load_jsonl(args.corpus, kind=args.kind, limits=limits)
    except FileNotFoundError as err:
        fail(f"{err} (rerun the rule that writes it)")
    except DataError as err:  # on_error: raise, at the first bad line
        fail(f"{err} (fix the line, or set {args.section}.on_error: drop to skip bad lines and count them)")
    try:
        require_examples(loaded, "preference pair" if args.kind == "preference" else "chat example")
        splits = make_splits(loaded.examples, own["n_val"], own["n_fisher"], own["seed"], own["n_test"])
    except (DataError, ValueError) as err:
        if loaded.rows_read:  # not an output of the job, so the counts outlive its failure
            write_json(report, loaded.manifest())
        cause = str(err) if isinstance(err, DataError) else (
            f"{err}, among the {len(loaded.examples)} records of {args.corpus} ({loaded.dropped.total} lines dropped): "
            f"lower {args.section}.n_val / n_fisher / n_test ({section.where.get('n_val', section.where[''])})")
        fail(f"{cause}" + (f"; what was read and dropped: {report}" if loaded.rows_read else ""))
    report.unlink(missing_ok=True)  # left by an earlier failed run; the manifest counts the drops now
    dropped = loaded.dropped.to_dict()
    write_splits(splits, args.out, {"source": loaded.source, "rows_read": loaded.rows_read, "dropped": dropped})
    print(f"[prepare_data] {splits.stats}; dropped while loading: {dict(loaded.dropped.counts) or 'none'} -> {args.out}")


if __name__ == "__main__":
    main()

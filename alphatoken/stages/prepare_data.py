"""Stage prepare_data: draw the target-validation, Fisher and test hold-outs (disjoint by prompt) and
the training pool from a chat corpus (or preference pairs, `--kind preference`), before any training.

    python -m alphatoken.stages.prepare_data --params params.yaml --section data \
        --corpus results/corpus/sft.jsonl --out results/data
"""

from __future__ import annotations

from alphatoken.data import DataError, DataLimits, load_jsonl, make_splits, write_splits
from alphatoken.stages.common import (
    ParamsError, fail, log_run_environment, read_section, split_section, stage_parser, to_config,
)

OWN_KEYS = ("n_val", "n_fisher", "seed")  # make_splits arguments; the rest are DataLimits fields
OPTIONAL_KEYS = {"n_test": 0}  # make_splits arguments with a default (the test hold-out)


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
    try:
        loaded = load_jsonl(args.corpus, kind=args.kind, limits=limits)
        splits = make_splits(loaded.examples, own["n_val"], own["n_fisher"], own["seed"], own["n_test"])
    except (DataError, ValueError, FileNotFoundError) as err:
        fail(f"{err} (check {args.corpus} or {args.section}.n_val / n_fisher / n_test)")
    dropped = loaded.dropped.to_dict()
    write_splits(splits, args.out, {"source": loaded.source, "rows_read": loaded.rows_read, "dropped": dropped})
    print(f"[prepare_data] {splits.stats}; dropped while loading: {dict(loaded.dropped.counts) or 'none'} -> {args.out}")


if __name__ == "__main__":
    main()

"""Stage build_corpus: the target corpus and its preference pairs. By default offline: instruction ->
code pairs from the running Python's standard library, decontaminated against HumanEval. The paper
configs name hub datasets instead (`sft_dataset`, `preference_dataset`: magicoder, ultrachat,
ultrafeedback; optionally read from a local copy), which replace the offline file they stand for.

    python -m alphatoken.stages.build_corpus --params params.yaml --section corpus --out results/corpus
"""

from __future__ import annotations

import json
from pathlib import Path

from alphatoken.corpus import write_corpus
from alphatoken.data import HUB_DATASETS, DataError, DataLimits, load_hub_dataset, require_examples, to_json
from alphatoken.stages.common import (
    ParamsError, fail, log_run_environment, read_section, split_section, stage_parser, to_kwargs, write_json,
)

HUB_KEYS = ("sft_dataset", "sft_local_path", "preference_dataset", "preference_local_path", "max_examples")
DROP_REPORT = "drop_report.json"  # written beside the corpus when every row of a hub dataset is dropped


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for sft.jsonl, preference.jsonl, manifest.json")
    args = parser.parse_args(argv)
    try:
        section = read_section(args.params, args.section)
        hub, rest = split_section(section, HUB_KEYS)
        kwargs = to_kwargs(rest, write_corpus, exclude=("out_dir", "problems"))
        for kind in ("sft", "preference"):
            name = hub.get(f"{kind}_dataset") or ""
            if name and (name not in HUB_DATASETS or HUB_DATASETS[name].kind != ("chat" if kind == "sft" else "preference")):
                raise ParamsError(f"{section.locate(kind + '_dataset')}: {name!r} is not a {kind} dataset of {sorted(HUB_DATASETS)}")
            if hub.get(f"{kind}_local_path") and not name:  # a local copy of no dataset would be ignored
                raise ParamsError(f"{section.locate(kind + '_local_path')}: a local copy is read only in place of "
                                  f"{args.section}.{kind}_dataset, which is empty: name the dataset, or leave it empty")
        if hub.get("max_examples") and not (hub.get("sft_dataset") or hub.get("preference_dataset")):
            raise ParamsError(f"{section.locate('max_examples')}: {hub['max_examples']} limits the rows of a hub "
                              "dataset, and none is named (sft_dataset, preference_dataset): set it to 0")
    except ParamsError as err:
        fail(str(err))
    log_run_environment("build_corpus", "cpu")
    try:
        result = write_corpus(args.out, **kwargs)
    except FileNotFoundError as err:
        fail(f"{err} (set {args.section}.stdlib_dir to a directory of Python sources, or leave it empty)")
    counts = result["counts"]
    manifest_path = Path(args.out) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for kind in ("sft", "preference"):
        name = hub.get(f"{kind}_dataset") or ""
        if not name:
            continue
        try:
            loaded = load_hub_dataset(name, DataLimits(on_error="drop", max_examples=int(hub.get("max_examples") or 0)),
                                      local_path=hub.get(f"{kind}_local_path") or None)
        except (DataError, FileNotFoundError, OSError) as err:
            fail(f"{err} ({args.section}.{kind}_dataset={name!r}: populate the HF cache or set {args.section}.{kind}_local_path)")
        try:
            require_examples(loaded, "preference pair" if kind == "preference" else "chat example")
        except DataError as err:  # every row dropped: the counts go to a report that outlives the failed job
            write_json(Path(args.out) / DROP_REPORT, {kind: loaded.manifest()})
            fail(f"{err} ({args.section}.{kind}_dataset={name!r}); what was read and dropped: {Path(args.out) / DROP_REPORT}")
        with open(Path(args.out) / f"{kind}.jsonl", "w", encoding="utf-8") as f:
            for example in loaded.examples:
                f.write(json.dumps(to_json(example), ensure_ascii=False, sort_keys=True) + "\n")
        counts[kind] = len(loaded.examples)
        manifest.setdefault("hub", {})[kind] = loaded.manifest()
    manifest["counts"] = counts
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    if counts["sft"] == 0:
        fail(f"the corpus is empty ({counts}); loosen {args.section}.min_doc_chars / max_code_chars")
    if counts["preference"] == 0:  # only the offline builder gets here (a hub dataset with no pair failed above)
        fail(f"no preference pair: no corruption applies to the {counts['sft']} corpus functions "
             f"({manifest['preference']['counts']}); see {manifest_path}")
    (Path(args.out) / DROP_REPORT).unlink(missing_ok=True)  # left by an earlier failed run
    print(f"[build_corpus] {counts} -> {args.out}")


if __name__ == "__main__":
    main()

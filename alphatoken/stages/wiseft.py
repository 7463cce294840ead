"""Stage wiseft: Wise-FT of one trained run (Wortsman et al., CVPR 2022), theta = (1 - alpha) theta_0 +
alpha theta_ft for every tensor (`alphatoken.merge.wise_ft`), theta_0 the base model --model and
theta_ft the final/ of --run (the run of `wiseft.of` with seed --seed), both loaded in `wiseft.dtype`;
writes --out/final (HF checkpoint and tokenizer, evaluated like a run's final/) and --out/merge.json
(alpha, of, seed, row name, the sources' paths and weight fingerprints, the merge's fingerprint).

    python -m alphatoken.stages.wiseft --params params.yaml --section wiseft --model results/model \
        --run results/train/full-0 --alpha 0.5 --seed 0 --out results/wiseft/0.5-0
"""

from __future__ import annotations

from pathlib import Path

from alphatoken.checkpoint import write_directory
from alphatoken.merge import MergeError, alpha_tag, row_name, wise_ft_model
from alphatoken.models import ModelSpec, load_model, save_pretrained, weights_fingerprint
from alphatoken.stages.common import ParamsError, fail, log_run_environment, read_section, stage_parser, write_json

FINAL = "final"  # the checkpoint directory of a run (alphatoken.train.loop.FINAL_DIR) and of a merge
OWN_KEYS = ("of", "dtype")  # what the stage reads of its section
MATRIX_KEYS = ("alphas",)  # which merges exist: the rule's wildcard, not a setting of one merge


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the base model, theta_0 (results/model)")
    parser.add_argument("--run", required=True, help="the trained run, theta_ft = its final/ (results/train/<of>-<seed>)")
    parser.add_argument("--alpha", required=True, help="mixing coefficient in [0, 1] as in paths and row names (0.5, 1.0)")
    parser.add_argument("--seed", type=int, required=True, help="seed of the run merged")
    parser.add_argument("--out", required=True, help="directory for final/ and merge.json")
    args = parser.parse_args(argv)
    try:
        section = read_section(args.params, args.section)
    except ParamsError as err:
        fail(str(err))
    of, dtype = section.values.get("of"), section.values.get("dtype", "float32")
    if not of:
        fail(f"{section.locate('')}: {section.name}.of is missing: the method of the trained run to merge (e.g. full)")
    try:
        alpha = float(args.alpha)
        tag = alpha_tag(alpha)
    except (ValueError, MergeError) as err:
        fail(f"--alpha {args.alpha!r}: {err}")
    if tag != args.alpha:
        fail(f"--alpha {args.alpha!r}: write it as {tag} (str() of the float: the form of the merge's path and row name)")
    run_dir = Path(args.run)
    if run_dir.name != f"{of}-{args.seed}":
        fail(f"--run {run_dir} is not the run of {section.name}.of={of!r} ({section.locate('of')}) with seed "
             f"{args.seed}: expected a run directory named {of}-{args.seed}")
    for path in (Path(args.model), run_dir / FINAL):
        if not (path / "config.json").is_file():
            fail(f"{path} holds no Hugging Face checkpoint (no config.json): rerun the rule that writes it")
    log_run_environment("wiseft", "cpu", args.params)
    base, _ = load_model(ModelSpec(source="hub", name_or_path=args.model, dtype=dtype, attn_implementation="eager"))
    finetuned, tokenizer = load_model(ModelSpec(source="hub", name_or_path=str(run_dir / FINAL), dtype=dtype,
                                                attn_implementation="eager"))
    sources = {"base": {"path": args.model, "fingerprint": weights_fingerprint(base)},
               "run": {"path": str(run_dir / FINAL), "fingerprint": weights_fingerprint(finetuned)}}
    try:
        merged = wise_ft_model(base, finetuned, alpha)
    except MergeError as err:
        fail(f"{err} (--model {args.model}, --run {run_dir / FINAL})")
    out = Path(args.out)
    write_directory(out / FINAL, lambda tmp: save_pretrained(merged, tokenizer, tmp))
    record = {"method": "wise_ft", "row": row_name(alpha), "alpha": alpha, "of": of, "seed": args.seed, "dtype": dtype,
              **sources, "fingerprint": weights_fingerprint(merged)}
    write_json(out / "merge.json", record)
    print(f"[wiseft] {row_name(alpha)} seed {args.seed}: (1 - {alpha}) {args.model} + {alpha} {run_dir / FINAL} "
          f"-> {out / FINAL}")


if __name__ == "__main__":
    main()

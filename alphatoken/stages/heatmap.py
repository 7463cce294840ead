"""Stage heatmap: HTML heatmaps of the four score components and the total (paper Fig. 4/9) for a few
training examples, scored on a trained AlphaToken run (the proxy P = F * (W - W_ref) is zero on the
reference itself) against the target-validation batch, with the reference model's scored weights and
its Fisher.

    python -m alphatoken.stages.heatmap --params params.yaml --section valuation --runs-section train \
        --runs results/train --reference results/model --fisher results/fisher.safetensors \
        --val-data results/data/val.jsonl --train-data results/data/train.jsonl --out results/report/heatmap.html
"""

from __future__ import annotations

from pathlib import Path

from alphatoken.blocks import scored_linears
from alphatoken.data import read_split
from alphatoken.eval.heatmap import write_heatmap_page
from alphatoken.fisher import load_fisher
from alphatoken.models import ModelSpec, load_model
from alphatoken.stages.common import ParamsError, fail, log_run_environment, pick_device, read_section, stage_parser, to_config
from alphatoken.train.data import as_batch
from alphatoken.valuation import TokenValuer, ValuationConfig

COMPONENTS = ("tgt_dir", "tgt_cau", "prx_dir", "prx_cau", "total")
EXAMPLES, MAX_LENGTH = 4, 512  # training examples shown; tokens per example


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--runs-section", required=True, help="section with the `methods` and `seeds` lists")
    for flag in ("--runs", "--reference", "--fisher", "--val-data", "--train-data", "--out"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    try:
        cfg = to_config(read_section(args.params, args.section), ValuationConfig)
        runs = read_section(args.params, args.runs_section).values
    except ParamsError as err:
        fail(str(err))
    methods = runs.get("methods") or []
    method = "alphatoken" if "alphatoken" in methods else methods[0]  # scores of the method's own run
    run = Path(args.runs) / f"{method}-{runs['seeds'][0]}" / "final"
    device = pick_device()
    log_run_environment("heatmap", device, args.params)
    model, tokenizer = load_model(ModelSpec(source="hub", name_or_path=str(run), attn_implementation="eager"), device)
    reference, _ = load_model(ModelSpec(source="hub", name_or_path=args.reference, attn_implementation="eager"), device)
    fisher = {k: v.to(device) for k, v in load_fisher(args.fisher, reference).items()}  # the reference's own Fisher
    ref_params = dict(reference.named_parameters())
    ref_weights = {name: ref_params[name].detach() for name in scored_linears(reference, cfg.last_k)}
    valuer = TokenValuer(model, cfg, fisher=fisher, reference=ref_weights)
    valuer.set_validation({k: v.to(device) for k, v in as_batch(tokenizer, read_split(args.val_data), MAX_LENGTH).items()})
    examples = []
    for example in read_split(args.train_data):  # the first EXAMPLES that fit MAX_LENGTH
        try:
            as_batch(tokenizer, [example], MAX_LENGTH)
        except ValueError:
            continue
        examples.append(example)
        if len(examples) == EXAMPLES:
            break
    if not examples:
        fail(f"no example of {args.train_data} fits {MAX_LENGTH} tokens")
    batch = {k: v.to(device) for k, v in as_batch(tokenizer, examples, MAX_LENGTH).items()}
    scores = valuer.score(batch)  # TokenScores, each (B, T), aligned with labels
    pages = []
    for row, example in enumerate(examples):
        positions = (batch["labels"][row] != -100).nonzero().flatten().tolist()  # response tokens
        tokens = [tokenizer.decode([int(batch["input_ids"][row, t])]) for t in positions]
        values = {c: [float(getattr(scores, c)[row, t]) for t in positions] for c in COMPONENTS}
        pages.append((tokens, values, f"{example.id} ({method} run {run.parent.name}, lam={cfg.lam})"))
    write_heatmap_page(pages, args.out, title=f"AlphaToken token values: {run.parent.name}")
    print(f"[heatmap] {len(pages)} examples -> {args.out}")


if __name__ == "__main__":
    main()

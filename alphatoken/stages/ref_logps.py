"""Stage ref_logps: the DPO reference model's (the warm-start checkpoint's) per-token losses of the DPO
training pairs and the sequence log-probabilities of the validation pairs, computed once for every DPO
run (`alphatoken.train.reference`), as safetensors with the identity of the model (weights
fingerprint) and of the data (content hashes, counts, max_length) that train_dpo checks before use.

    python -m alphatoken.stages.ref_logps --params params.yaml --section dpo --model results/dpo/warmstart/final \
        --train-data results/dpo/data/train.jsonl --val-data results/dpo/data/val.jsonl \
        --out results/dpo/ref_logps.safetensors
"""

from __future__ import annotations

from alphatoken.data import DataError, read_split
from alphatoken.models import ModelSpec, load_model
from alphatoken.stages.common import ParamsError, fail, log_run_environment, pick_device, read_section, stage_parser
from alphatoken.train.config import TrainConfig
from alphatoken.train.reference import compute_reference_logps, save_reference_logps

# The keys of the DPO section the values depend on (the rest configures the runs, e.g. rho, lr),
# with the defaults the train stage uses, and what a valid value is.
KEYS = {
    "max_length": (TrainConfig.max_length, "an integer >= 2", lambda v: _is_int(v) and v >= 2),
    "micro_batch_size": (TrainConfig.micro_batch_size, "an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "val_examples": (0, "an integer >= 0 (0: all)", lambda v: _is_int(v) and v >= 0),
    "dtype": ("float32", "a torch dtype name", lambda v: isinstance(v, str) and v in ("float32", "float64", "bfloat16", "float16")),
    "attn_implementation": ("eager", "an attention kernel name", lambda v: isinstance(v, str) and bool(v)),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_settings(params: list, section_name: str) -> dict:
    """The KEYS of the section (defaults where absent); ParamsError names file, line and field."""
    section = read_section(params, section_name)
    settings = {}
    for key, (default, expected, valid) in KEYS.items():
        value = section.values.get(key, default)
        if not valid(value):
            raise ParamsError(f"{section.locate(key)}: expected {expected}, got {value!r}")
        settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    for flag, what in (("--model", "the reference checkpoint (the warm-start)"), ("--train-data", "DPO training pairs"),
                       ("--val-data", "DPO validation pairs"), ("--out", "safetensors file to write")):
        parser.add_argument(flag, required=True, help=what)
    args = parser.parse_args(argv)
    try:
        own = read_settings(args.params, args.section)
    except ParamsError as err:
        fail(str(err))
    device = pick_device()
    log_run_environment("ref_logps", device, args.params)
    model, tokenizer = load_model(ModelSpec(source="hub", name_or_path=args.model, dtype=own["dtype"],
                                            attn_implementation=own["attn_implementation"]), device)
    try:
        train, val = read_split(args.train_data), read_split(args.val_data)
    except (DataError, FileNotFoundError) as err:
        fail(f"{err} (rerun prepare_preference)")
    val = val[: own["val_examples"]] if own["val_examples"] else val  # the validation pairs the runs use
    try:
        reference = compute_reference_logps(model, tokenizer, train, val, own["max_length"], own["micro_batch_size"])
    except ValueError as err:
        fail(f"{err} (check {args.section}.max_length and the pairs in {args.train_data})")
    save_reference_logps(args.out, reference)
    meta = reference.metadata
    print(f"[ref_logps] {meta['train_count']} pairs (skipped: {meta['train_skipped']}), {meta['val_count']} validation "
          f"pairs, model {meta['weights_fingerprint'][:12]} -> {args.out}")


if __name__ == "__main__":
    main()

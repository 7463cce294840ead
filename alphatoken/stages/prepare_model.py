"""Stage prepare_model: turn the configured model (embedded GGUF, hub id / local directory, or tiny
random) into a standard Hugging Face checkpoint directory, plus a JSON with its weights fingerprint.

    python -m alphatoken.stages.prepare_model --params params.yaml --section model \
        --out results/model --identity results/model.json
"""

from __future__ import annotations

from alphatoken.models import ModelSpec, load_model, save_pretrained, weights_fingerprint
from alphatoken.stages.common import (
    ParamsError, fail, log_run_environment, read_section, stage_parser, to_config, write_json,
)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--identity", required=True, help="JSON file for the fingerprint and provenance")
    args = parser.parse_args(argv)
    try:
        spec = to_config(read_section(args.params, args.section), ModelSpec)
    except ParamsError as err:
        fail(str(err))
    log_run_environment("prepare_model", "cpu", args.params)  # conversion only: no accelerator needed
    try:
        model, tokenizer = load_model(spec)
    except (FileNotFoundError, OSError, ValueError) as err:
        fail(f"cannot load the model of section {args.section!r} ({spec}): {err}")
    fingerprint = weights_fingerprint(model)
    save_pretrained(model, tokenizer, args.out)
    # Round trip: the checkpoint must hold exactly the weights that were fingerprinted.
    reloaded, _ = load_model(ModelSpec(source="hub", name_or_path=args.out, dtype=spec.dtype,
                                       attn_implementation=spec.attn_implementation))
    if weights_fingerprint(reloaded) != fingerprint:
        fail(f"{args.out}: the saved checkpoint does not reload to the same weights")
    write_json(args.identity, {
        "fingerprint": fingerprint,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "architecture": type(model).__name__,
        "spec": {k: v for k, v in vars(spec).items()},
        "checkpoint": str(args.out),
    })
    print(f"[prepare_model] {type(model).__name__} fingerprint {fingerprint[:16]} -> {args.out}")


if __name__ == "__main__":
    main()

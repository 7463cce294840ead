# LESS (Xia et al., ICML 2024; params.yaml `less`, off by default): a selection stage before training, not
# a token policy, so not an item of train.methods. `less` warms up a LoRA adapter, scores every training
# example by the similarity of its gradients to the validation set's and writes the selected examples
# (results/less/selection/selection.jsonl; cached: reruns only when the `less` settings, the model, the
# train or val data, or its code change); `train_less` trains on them with policy `full` (all tokens) and
# the `train` settings, one run per less.seeds, evaluated like every run; the report's row `less`.
# dvc.yaml has these stages only when generated from parameters that enable them
# (`python workflow/scripts/sync_dvc.py --use configs/experiments/baselines.yaml`).

LESS_RULE_KEYS = ("enabled", "seeds")  # read by the rules, not by the selection (RULE_KEYS of alphatoken/stages/less.py)


wildcard_constraints:
    less_seed="[0-9]+",


rule less:
    input:
        code=stage_code("less"),
        model=rules.prepare_model.output.model,
        train=rules.prepare_data.output.train,
        val=rules.prepare_data.output.val,
    output:
        selection=directory("results/less/selection"),
    params:
        less={k: v for k, v in config.get("less", {}).items() if k not in LESS_RULE_KEYS},
    log:
        "logs/less.log",
    benchmark:
        "benchmarks/less.tsv"
    threads: rule_threads("less")
    resources:
        **rule_resources("less"),
    conda:
        ENV
    shell:
        stage(
            "less",
            "less",
            "--model {input.model} --train-data {input.train} --val-data {input.val} --out {output.selection}",
        )


rule train_less:
    input:
        code=stage_code("train"),
        model=rules.prepare_model.output.model,
        selection=rules.less.output.selection,
        val=rules.prepare_data.output.val,
        held_out=rules.prepare_data.output.test,  # probes of the value-realisation record (train.realisation_every)
    output:
        run=directory(RUN_KINDS["less"].run_dir),  # results/less/train/less-{less_seed}
    params:
        train=run_params("train"),
        valuation=config["valuation"],
    log:
        "logs/train_less/{less_seed}.log",
    benchmark:
        "benchmarks/train_less/{less_seed}.tsv"
    threads: rule_threads("train_less")
    resources:
        **rule_resources("train_less"),
    conda:
        ENV
    shell:
        stage(
            "train",
            "train",
            "--valuation-section valuation --objective sft --method full --rule train_less --seed {wildcards.less_seed} "
            "--model {input.model} --train-data {input.selection}/selection.jsonl --val-data {input.val} "
            "--realisation-data {input.held_out} --out {output.run}",
        )


rule evaluate_less:
    input:
        code=stage_code("evaluate"),
        run=rules.train_less.output.run,
        reference=rules.prepare_model.output.model,
        prompts=rules.prepare_data.output.val,
        test=rules.prepare_data.output.test,
    output:
        eval=directory(RUN_KINDS["less"].eval_dir),  # results/eval/less/less-{less_seed}
    params:
        eval=config["eval"],
    log:
        "logs/evaluate_less/{less_seed}.log",
    benchmark:
        "benchmarks/evaluate_less/{less_seed}.tsv"
    threads: rule_threads("evaluate_less")
    resources:
        **rule_resources("evaluate_less"),
    conda:
        ENV
    shell:
        stage(
            "evaluate",
            "eval",
            "--model {input.run}/final --reference {input.reference} --prompts {input.prompts} "
            "--test-data {input.test} --out {output.eval}",
        )

# One token-masked fine-tuning run per method x seed (params.yaml `train.methods`, `train.seeds`; a method
# is a token policy or a named variant of `train.variants`),
# all from the reference model, with the cached Fisher for the retention proxy (a GPU rule; with
# `resources.train.gpu > 1` the stage runs torchrun inside its one job).


rule train:
    input:
        code=stage_code("train"),
        model=rules.prepare_model.output.model,
        train=rules.prepare_data.output.train,
        val=rules.prepare_data.output.val,
        fisher=rules.fisher.output.fisher,
        fisher_prompts=rules.prepare_data.output.fisher,
        held_out=rules.prepare_data.output.test,  # probes of the value-realisation record (train.realisation_every)
    output:
        run=directory("results/train/{method}-{seed}"),
    params:
        train=run_settings("train"),
        valuation=run_valuation("train"),
        fisher=config["fisher"],  # settings of the factor Fisher of the LoRA scoring policies
    log:
        "logs/train/{method}-{seed}.log",
    benchmark:
        "benchmarks/train/{method}-{seed}.tsv"
    threads: rule_threads("train")
    priority: TRAIN_PRIORITY
    resources:
        **rule_resources("train"),
    conda:
        ENV
    shell:
        stage(
            "train",
            "train",
            "--valuation-section valuation --objective sft --method {wildcards.method} --seed {wildcards.seed} "
            "--model {input.model} --train-data {input.train} --val-data {input.val} --fisher {input.fisher} "
            "--fisher-prompts {input.fisher_prompts} --fisher-section fisher --realisation-data {input.held_out} "
            "--out {output.run}",
        )

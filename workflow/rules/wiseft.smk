# Wise-FT (Wortsman et al., CVPR 2022) after training: the weights of run `wiseft.of` (one per seed of
# train.seeds) mixed with the base model's, theta = (1 - alpha) theta_0 + alpha theta_ft for every tensor,
# once per alpha of `wiseft.alphas` (a CPU rule), each merge then evaluated like a run (a GPU rule) and
# listed by the report as row `wiseft_a<alpha>` (--extra-run; helpers in common.smk). `wiseft.alphas: []`
# (the default) adds no job. The run merged is trained even when `wiseft.of` is not in train.methods (for
# dvc.yaml it must be: DVC trains the train.methods matrix only).


rule wiseft:
    input:
        code=stage_code("wiseft"),
        model=rules.prepare_model.output.model,
        run=f"results/train/{config['wiseft']['of']}-{{seed}}",
    output:
        merged=directory(WISEFT_MERGE),
    params:
        wiseft=run_params("wiseft"),  # of, dtype: adding an alpha does not rerun the other merges
    wildcard_constraints:
        alpha=r"[01]\.[0-9]+",
    log:
        "logs/wiseft/{alpha}-{seed}.log",
    benchmark:
        "benchmarks/wiseft/{alpha}-{seed}.tsv"
    threads: rule_threads("wiseft")
    resources:
        **rule_resources("wiseft"),
    conda:
        ENV
    shell:
        stage(
            "wiseft",
            "wiseft",
            "--model {input.model} --run {input.run} --alpha {wildcards.alpha} --seed {wildcards.seed} --out {output.merged}",
        )


rule evaluate_wiseft:
    input:
        code=stage_code("evaluate"),
        run=rules.wiseft.output.merged,
        reference=rules.prepare_model.output.model,
        prompts=rules.prepare_data.output.val,
        test=rules.prepare_data.output.test,
    output:
        eval=directory(RUN_KINDS["wiseft"].eval_dir),  # results/eval/wiseft/{alpha}-{seed}
    params:
        eval=config["eval"],
    wildcard_constraints:
        alpha=r"[01]\.[0-9]+",
    log:
        "logs/evaluate_wiseft/{alpha}-{seed}.log",
    benchmark:
        "benchmarks/evaluate_wiseft/{alpha}-{seed}.tsv"
    threads: rule_threads("evaluate_wiseft")
    resources:
        **rule_resources("evaluate_wiseft"),
    conda:
        ENV
    shell:
        stage(
            "evaluate",
            "eval",
            "--model {input.run}/final --reference {input.reference} --prompts {input.prompts} "
            "--test-data {input.test} --out {output.eval}",
        )

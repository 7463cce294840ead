# The DPO route (params.yaml `routes: [..., dpo]`): warm-start SFT on the target corpus (policy
# `full`), the Fisher of the warm-started model (the DPO reference) and its log-probabilities of the
# DPO pairs (ref_logps, once for all runs), then one token-masked DPO run per dpo.methods x dpo.seeds
# from it, evaluated against it, and their report; with sepo.seeds, SePO's oracle, token rewards and
# runs (rules sepo_*, train_sepo, evaluate_sepo), reported as row `sepo`.

# The dpo keys the reference log-probs depend on (KEYS of alphatoken/stages/ref_logps.py; checked by
# tests/test_pipeline_dag.py): a run setting such as dpo.rho or dpo.lr does not recompute them.
REF_LOGPS_KEYS = ("max_length", "micro_batch_size", "val_examples", "dtype", "attn_implementation")


rule prepare_preference:
    input:
        code=stage_code("prepare_data"),
        corpus=rules.build_corpus.output.preference,
    output:
        train="results/dpo/data/train.jsonl",
        val="results/dpo/data/val.jsonl",
        fisher="results/dpo/data/fisher.jsonl",
        test="results/dpo/data/test.jsonl",
        manifest="results/dpo/data/manifest.json",
    params:
        preference_data=config["preference_data"],
    log:
        "logs/prepare_preference.log",
    benchmark:
        "benchmarks/prepare_preference.tsv"
    threads: rule_threads("prepare_preference")
    resources:
        **rule_resources("prepare_preference"),
    conda:
        ENV
    shell:
        stage("prepare_data", "preference_data", "--kind preference --corpus {input.corpus} --out results/dpo/data")


rule warmstart_sft:
    input:
        code=stage_code("train"),
        model=rules.prepare_model.output.model,
        train=rules.prepare_data.output.train,
        val=rules.prepare_data.output.val,
    output:
        run=directory("results/dpo/warmstart"),
    params:
        warmstart=config["warmstart"],
        valuation=config["valuation"],
    log:
        "logs/warmstart_sft.log",
    benchmark:
        "benchmarks/warmstart_sft.tsv"
    threads: rule_threads("warmstart_sft")
    resources:
        **rule_resources("warmstart_sft"),
    conda:
        ENV
    shell:
        stage(
            "train",
            "warmstart",
            "--valuation-section valuation --objective sft --method full --rule warmstart_sft --model {input.model} "
            "--train-data {input.train} --val-data {input.val} --out {output.run}",
        )


rule fisher_dpo:
    input:
        code=stage_code("fisher"),
        run=rules.warmstart_sft.output.run,
        prompts=rules.prepare_data.output.fisher,
    output:
        fisher="results/dpo/fisher.safetensors",
        summary="results/dpo/fisher.json",
    params:
        fisher=config["fisher"],
    log:
        "logs/fisher_dpo.log",
    benchmark:
        "benchmarks/fisher_dpo.tsv"
    threads: rule_threads("fisher_dpo")
    resources:
        **rule_resources("fisher_dpo"),
    conda:
        ENV
    shell:
        stage(
            "fisher",
            "fisher",
            "--model {input.run}/final --prompts {input.prompts} --out {output.fisher} --summary {output.summary}",
        )


rule ref_logps:
    input:
        code=stage_code("ref_logps"),
        run=rules.warmstart_sft.output.run,
        train=rules.prepare_preference.output.train,
        val=rules.prepare_preference.output.val,
    output:
        ref_logps="results/dpo/ref_logps.safetensors",
    params:
        dpo={k: v for k, v in config["dpo"].items() if k in REF_LOGPS_KEYS},
    log:
        "logs/ref_logps.log",
    benchmark:
        "benchmarks/ref_logps.tsv"
    threads: rule_threads("ref_logps")
    resources:
        **rule_resources("ref_logps"),
    conda:
        ENV
    shell:
        stage(
            "ref_logps",
            "dpo",
            "--model {input.run}/final --train-data {input.train} --val-data {input.val} --out {output.ref_logps}",
        )


rule train_dpo:
    input:
        code=stage_code("train"),
        run=rules.warmstart_sft.output.run,
        train=rules.prepare_preference.output.train,
        val=rules.prepare_preference.output.val,
        fisher=rules.fisher_dpo.output.fisher,
        fisher_prompts=rules.prepare_data.output.fisher,
        ref_logps=rules.ref_logps.output.ref_logps,
    output:
        run=directory("results/dpo/train/{dpo_method}-{dpo_seed}"),
    params:
        dpo=run_params("dpo"),
        valuation=config["valuation"],
        fisher=config["fisher"],  # settings of the factor Fisher of the LoRA scoring policies
    log:
        "logs/train_dpo/{dpo_method}-{dpo_seed}.log",
    benchmark:
        "benchmarks/train_dpo/{dpo_method}-{dpo_seed}.tsv"
    threads: rule_threads("train_dpo")
    priority: TRAIN_PRIORITY
    resources:
        **rule_resources("train_dpo"),
    conda:
        ENV
    shell:
        stage(
            "train",
            "dpo",
            "--valuation-section valuation --objective dpo --rule train_dpo --method {wildcards.dpo_method} "
            "--seed {wildcards.dpo_seed} "
            "--model {input.run}/final --train-data {input.train} --val-data {input.val} --fisher {input.fisher} "
            "--fisher-prompts {input.fisher_prompts} --fisher-section fisher --reference-logps {input.ref_logps} --out {output.run}",
        )


rule evaluate_warmstart:
    input:
        code=stage_code("evaluate"),
        run=rules.warmstart_sft.output.run,
    output:
        eval=directory("results/dpo/eval/base"),
    params:
        eval=config["eval"],
    log:
        "logs/evaluate_warmstart.log",
    benchmark:
        "benchmarks/evaluate_warmstart.tsv"
    threads: rule_threads("evaluate_warmstart")
    resources:
        **rule_resources("evaluate_warmstart"),
    conda:
        ENV
    shell:
        stage("evaluate", "eval", "--model {input.run}/final --out {output.eval}")


rule evaluate_dpo:
    input:
        code=stage_code("evaluate"),
        run=rules.train_dpo.output.run,
        reference=rules.warmstart_sft.output.run,
        prompts=rules.prepare_data.output.val,
    output:
        eval=directory("results/dpo/eval/runs/{dpo_method}-{dpo_seed}"),
    params:
        eval=config["eval"],
    log:
        "logs/evaluate_dpo/{dpo_method}-{dpo_seed}.log",
    benchmark:
        "benchmarks/evaluate_dpo/{dpo_method}-{dpo_seed}.tsv"
    threads: rule_threads("evaluate_dpo")
    resources:
        **rule_resources("evaluate_dpo"),
    conda:
        ENV
    shell:
        stage(
            "evaluate",
            "eval",
            "--model {input.run}/final --reference {input.reference}/final --prompts {input.prompts} --out {output.eval}",
        )


# SePO (params.yaml `sepo:`, off while sepo.seeds is empty): its oracle is a DPO run of its own on a
# seeded random subset of the pairs, whose per-token rewards select the tokens of every SePO run; so
# SePO is not an item of dpo.methods (whose runs all share one command and inputs) but these rules,
# its runs reported as row `sepo` (--extra-run).
SEPO_SUBSET_KEYS = ("oracle_fraction", "oracle_seed")


rule sepo_subset:
    input:
        code=stage_code("sepo"),
        train=rules.prepare_preference.output.train,
    output:
        train="results/dpo/sepo/oracle_train.jsonl",
    params:
        sepo={k: v for k, v in (config.get("sepo") or {}).items() if k in SEPO_SUBSET_KEYS},
    log:
        "logs/sepo_subset.log",
    benchmark:
        "benchmarks/sepo_subset.tsv"
    threads: rule_threads("sepo_subset")
    resources:
        **rule_resources("sepo_subset"),
    conda:
        ENV
    shell:
        stage("sepo", "sepo", "subset --train-data {input.train} --out {output.train}")


rule sepo_oracle:
    input:
        code=stage_code("train"),
        run=rules.warmstart_sft.output.run,
        train=rules.sepo_subset.output.train,
        val=rules.prepare_preference.output.val,
    output:
        run=directory("results/dpo/sepo/oracle"),
    params:
        dpo=run_params("dpo"),
        valuation=config["valuation"],  # (sepo.oracle_seed, its --seed, reruns it through its subset)
    log:
        "logs/sepo_oracle.log",
    benchmark:
        "benchmarks/sepo_oracle.tsv"
    threads: rule_threads("sepo_oracle")
    resources:
        **rule_resources("sepo_oracle"),
    conda:
        ENV
    shell:
        stage(
            "train",
            "dpo",
            "--valuation-section valuation --objective dpo --rule sepo_oracle --method full "
            f"--seed {(config.get('sepo') or {}).get('oracle_seed', 0)} "
            "--model {input.run}/final --train-data {input.train} --val-data {input.val} --out {output.run}",
        )


rule sepo_scores:
    input:
        code=stage_code("sepo"),
        oracle=rules.sepo_oracle.output.run,
        run=rules.warmstart_sft.output.run,
        train=rules.prepare_preference.output.train,
    output:
        rewards="results/dpo/sepo/token_rewards.safetensors",
    params:
        dpo={k: v for k, v in config["dpo"].items() if k in REF_LOGPS_KEYS},
    log:
        "logs/sepo_scores.log",
    benchmark:
        "benchmarks/sepo_scores.tsv"
    threads: rule_threads("sepo_scores")
    resources:
        **rule_resources("sepo_scores"),
    conda:
        ENV
    shell:
        stage(
            "sepo",
            "dpo",
            "scores --oracle {input.oracle}/final --model {input.run}/final "
            "--train-data {input.train} --out {output.rewards}",
        )


rule train_sepo:
    input:
        code=stage_code("train"),
        run=rules.warmstart_sft.output.run,
        train=rules.prepare_preference.output.train,
        val=rules.prepare_preference.output.val,
        rewards=rules.sepo_scores.output.rewards,
        ref_logps=rules.ref_logps.output.ref_logps,
    output:
        run=directory(RUN_KINDS["sepo"].run_dir),  # results/dpo/sepo/train/{sepo_seed}
    params:
        dpo=run_params("dpo"),
        valuation=config["valuation"],
    log:
        "logs/train_sepo/{sepo_seed}.log",
    benchmark:
        "benchmarks/train_sepo/{sepo_seed}.tsv"
    threads: rule_threads("train_sepo")
    resources:
        **rule_resources("train_sepo"),
    conda:
        ENV
    shell:
        stage(
            "train",
            "dpo",
            "--valuation-section valuation --objective dpo --rule train_sepo --method sepo --seed {wildcards.sepo_seed} "
            "--model {input.run}/final --train-data {input.train} --val-data {input.val} "
            "--reference-logps {input.ref_logps} --token-rewards {input.rewards} --out {output.run}",
        )


rule evaluate_sepo:
    input:
        code=stage_code("evaluate"),
        run=rules.train_sepo.output.run,
        reference=rules.warmstart_sft.output.run,
        prompts=rules.prepare_data.output.val,
    output:
        eval=directory(RUN_KINDS["sepo"].eval_dir),  # results/dpo/eval/sepo/{sepo_seed}
    params:
        eval=config["eval"],
    log:
        "logs/evaluate_sepo/{sepo_seed}.log",
    benchmark:
        "benchmarks/evaluate_sepo/{sepo_seed}.tsv"
    threads: rule_threads("evaluate_sepo")
    resources:
        **rule_resources("evaluate_sepo"),
    conda:
        ENV
    shell:
        stage(
            "evaluate",
            "eval",
            "--model {input.run}/final --reference {input.reference}/final --prompts {input.prompts} --out {output.eval}",
        )


rule report_dpo:
    input:
        code=stage_code("report"),
        base=rules.evaluate_warmstart.output.eval,
        evals=all_runs(rules.evaluate_dpo.output.eval),
        runs=all_runs(rules.train_dpo.output.run),
        sepo_evals=[run.eval_dir for run in extra_runs("dpo")],  # rows outside the matrix (alphatoken.runs: sepo)
        sepo_runs=[run.run_dir for run in extra_runs("dpo") if run.run_dir != "-"],
    output:
        table=f"{report_dir('dpo')}/table.md",
        table_csv=f"{report_dir('dpo')}/table.csv",
        metrics=f"{report_dir('dpo')}/metrics.json",
        comparisons=f"{report_dir('dpo')}/comparisons.md",
        comparisons_csv=f"{report_dir('dpo')}/comparisons.csv",
        tradeoff=f"{report_dir('dpo')}/tradeoff.png",
        tradeoff_svg=f"{report_dir('dpo')}/tradeoff.svg",
        tradeoff_csv=f"{report_dir('dpo')}/tradeoff.csv",
        curves_png=f"{report_dir('dpo')}/curves.png",
        curves=directory(f"{report_dir('dpo')}/curves"),
    params:
        report=config["report"],
        dpo=matrix_params("dpo_method", "dpo_seed"),
    log:
        "logs/report_dpo.log",
    benchmark:
        "benchmarks/report_dpo.tsv"
    threads: rule_threads("report_dpo")
    resources:
        **rule_resources("report_dpo"),
    conda:
        ENV
    shell:
        stage(
            "report",
            "report",
            "--runs-section dpo --base {input.base} --evals results/dpo/eval/runs --train results/dpo/train "
            f"--out {report_dir('dpo')} --base-name warmstart"
            + extra_run_args("dpo"),
        )

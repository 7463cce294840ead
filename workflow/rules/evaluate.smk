# Evaluation (a GPU rule): the base model once (the reference row of the table) and every run;
# then the report over all runs (and the Wise-FT merges of workflow/rules/wiseft.smk).


rule evaluate_base:
    input:
        code=stage_code("evaluate"),
        model=rules.prepare_model.output.model,
        test=rules.prepare_data.output.test,
    output:
        eval=directory("results/eval/base"),
    params:
        eval=config["eval"],
    log:
        "logs/evaluate_base.log",
    benchmark:
        "benchmarks/evaluate_base.tsv"
    threads: rule_threads("evaluate_base")
    resources:
        **rule_resources("evaluate_base"),
    conda:
        ENV
    shell:
        stage("evaluate", "eval", "--model {input.model} --test-data {input.test} --out {output.eval}")


rule evaluate:
    input:
        code=stage_code("evaluate"),
        run=rules.train.output.run,
        reference=rules.prepare_model.output.model,
        prompts=rules.prepare_data.output.val,
        test=rules.prepare_data.output.test,
    output:
        eval=directory("results/eval/runs/{method}-{seed}"),
    params:
        eval=config["eval"],
    log:
        "logs/evaluate/{method}-{seed}.log",
    benchmark:
        "benchmarks/evaluate/{method}-{seed}.tsv"
    threads: rule_threads("evaluate")
    resources:
        **rule_resources("evaluate"),
    conda:
        ENV
    shell:
        stage(
            "evaluate",
            "eval",
            "--model {input.run}/final --reference {input.reference} --prompts {input.prompts} "
            "--test-data {input.test} --out {output.eval}",
        )


rule report:
    input:
        code=stage_code("report"),
        base=rules.evaluate_base.output.eval,
        evals=all_runs(rules.evaluate.output.eval),
        runs=all_runs(rules.train.output.run),
        # rows outside the matrix (alphatoken.runs: less-<seed>, the Wise-FT merges wiseft_a<alpha>; a merge has no run dir)
        extra_evals=[run.eval_dir for run in extra_runs("sft")],
        extra_runs=[run.run_dir for run in extra_runs("sft") if run.run_dir != "-"],
    output:
        table=f"{report_dir()}/table.md",
        table_csv=f"{report_dir()}/table.csv",
        metrics=f"{report_dir()}/metrics.json",
        comparisons=f"{report_dir()}/comparisons.md",
        comparisons_csv=f"{report_dir()}/comparisons.csv",
        tradeoff=f"{report_dir()}/tradeoff.png",
        tradeoff_svg=f"{report_dir()}/tradeoff.svg",
        tradeoff_csv=f"{report_dir()}/tradeoff.csv",
        curves_png=f"{report_dir()}/curves.png",
        curves=directory(f"{report_dir()}/curves"),
    params:
        report=config["report"],
        train=matrix_params("method", "seed"),
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    threads: rule_threads("report")
    resources:
        **rule_resources("report"),
    conda:
        ENV
    shell:
        stage(
            "report",
            "report",
            "--runs-section train --base {input.base} --evals results/eval/runs --train results/train "
            f"--out {report_dir()}{extra_run_args('sft')}",
        )


rule heatmap:
    input:
        code=stage_code("heatmap"),
        runs=all_runs(rules.train.output.run),
        reference=rules.prepare_model.output.model,
        fisher=rules.fisher.output.fisher,
        val=rules.prepare_data.output.val,
        train=rules.prepare_data.output.train,
    output:
        html="results/heatmap.html",
    params:
        valuation=config["valuation"],
        train=matrix_params("method", "seed"),
    log:
        "logs/heatmap.log",
    benchmark:
        "benchmarks/heatmap.tsv"
    threads: rule_threads("heatmap")
    resources:
        **rule_resources("heatmap"),
    conda:
        ENV
    shell:
        stage(
            "heatmap",
            "valuation",
            "--runs-section train --runs results/train --reference {input.reference} --fisher {input.fisher} "
            "--val-data {input.val} --train-data {input.train} --out {output.html}",
        )

# The paper's App. D diagnostics on one trained run (`diagnostics.run`), run by name, not by `all`:
#   snakemake --cores 2 proxy_oracle attention_deviation
# D.1 proxy_oracle: Fisher-drift proxy vs oracle retention-gradient token scores (correlations,
# top-rho overlap, figure); D.2 attention_deviation: attention weight vs value-output deviation over
# the causal-window pairs of the scored blocks (quantiles, density figure).

DIAGNOSED_RUN = f"results/train/{config['diagnostics']['run']}"
# the evaluation settings that decide which benchmark documents it reads (the oracle set avoids them)
ORACLE_EVAL_KEYS = ("suite", "limit", "task_limits", "drift_docs")


rule proxy_oracle:
    input:
        code=stage_code("diagnostics"),
        run=DIAGNOSED_RUN,
        reference=rules.prepare_model.output.model,
        fisher=rules.fisher.output.fisher,
        train=rules.prepare_data.output.train,
    output:
        out=directory("results/diagnostics/proxy_oracle"),
    params:
        diagnostics=config["diagnostics"],
        valuation=config["valuation"],
        train={"rho": config["train"]["rho"]},
        eval={k: config["eval"][k] for k in ORACLE_EVAL_KEYS if k in config["eval"]},
    log:
        "logs/proxy_oracle.log",
    benchmark:
        "benchmarks/proxy_oracle.tsv"
    threads: rule_threads("proxy_oracle")
    resources:
        **rule_resources("proxy_oracle"),
    conda:
        ENV
    shell:
        stage(
            "diagnostics",
            "diagnostics",
            "--diagnostic proxy_oracle --valuation-section valuation --train-section train --eval-section eval --run {input.run} "
            "--reference {input.reference} --fisher {input.fisher} --train-data {input.train} --out {output.out}",
        )


rule attention_deviation:
    input:
        code=stage_code("diagnostics"),
        run=DIAGNOSED_RUN,
        train=rules.prepare_data.output.train,
    output:
        out=directory("results/diagnostics/attention"),
    params:
        diagnostics=config["diagnostics"],
        valuation={k: config["valuation"][k] for k in ("last_k", "window")},
    log:
        "logs/attention_deviation.log",
    benchmark:
        "benchmarks/attention_deviation.tsv"
    threads: rule_threads("attention_deviation")
    resources:
        **rule_resources("attention_deviation"),
    conda:
        ENV
    shell:
        stage(
            "diagnostics",
            "diagnostics",
            "--diagnostic attention_deviation --valuation-section valuation --run {input.run} --train-data {input.train} --out {output.out}",
        )

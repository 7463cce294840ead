# The Monte-Carlo Fisher of the reference model (a GPU rule): cached, recomputed only when the
# reference model, the Fisher prompts, the `fisher` parameters or the code it runs change.


rule fisher:
    input:
        code=stage_code("fisher"),
        model=rules.prepare_model.output.model,
        identity=rules.prepare_model.output.identity,
        prompts=rules.prepare_data.output.fisher,
    output:
        fisher="results/fisher.safetensors",
        summary="results/fisher.json",
    params:
        fisher=config["fisher"],
    log:
        "logs/fisher.log",
    benchmark:
        "benchmarks/fisher.tsv"
    threads: rule_threads("fisher")
    resources:
        **rule_resources("fisher"),
    conda:
        ENV
    shell:
        stage(
            "fisher",
            "fisher",
            "--model {input.model} --prompts {input.prompts} --out {output.fisher} --summary {output.summary}",
        )

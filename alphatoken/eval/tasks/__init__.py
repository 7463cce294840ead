"""Data generators of the offline retention suite: each returns plain JSON-able documents that
`alphatoken.eval.harness.build_offline_tasks` writes next to lm-eval YAML task definitions.

    wordnet      -- WordNet definitions as 4-way multiple choice (stands in for ARC-C/MMLU knowledge)
    arithmetic   -- templated arithmetic word problems, exact match after "####" (stands in for GSM8K)
    python_lines -- next line of Python standard-library code, 4-way multiple choice (HellaSwag-like
                    continuation choice)
"""

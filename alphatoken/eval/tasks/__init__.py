"""Data generators of the synthetic retention suite (a fallback where no real evaluation set is
available): each returns plain JSON-able documents that `alphatoken.eval.harness.build_synthetic_tasks`
writes next to lm-eval YAML task definitions.

    wordnet      -- WordNet definitions as 4-way multiple choice (a knowledge probe)
    arithmetic   -- templated arithmetic word problems, exact match after "####" (GSM8K's format)
"""

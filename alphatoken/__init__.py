"""AlphaToken: path-aware response-token valuation for LLM post-training.

Library layout (each module is one idea):
    valuation  -- the four token scores (direct/causal x target/proxy) via ghost dot-products
    fisher     -- Monte-Carlo diagonal Fisher of the scored weights at the reference model
    models     -- loading models/tokenizers (hub id, local path, embedded GGUF, tiny random)
    data       -- corpora, chat formatting, validation/Fisher hold-out splits
    losses     -- masked SFT/DPO losses and top-rho masks
    policies   -- token-selection policies (AlphaToken, ablations, baselines)
    train      -- plain SFT/DPO training loops
    eval       -- lm-eval retention suite, HumanEval in a sandbox, reports
    integrations -- the same inside other frameworks (TRL's trainers; optional extra `alphatoken[trl]`)
"""

__version__ = "0.1.0"

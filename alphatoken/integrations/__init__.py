"""Adapters that run AlphaToken inside other training frameworks, each an optional dependency:

    trl  -- `AlphaTokenSFTTrainer` / `AlphaTokenDPOTrainer`, TRL's trainers with the library's valuation,
            masks and losses (`pip install 'alphatoken[trl]'`; `from alphatoken.integrations.trl import ...`)

Importing this package imports no framework; only its submodules do.
"""

"""Quality evaluation: perplexity, long-context retrieval, draft acceptance, MoE routing (``ferry eval``)."""

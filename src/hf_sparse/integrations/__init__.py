"""Adapters to the Hugging Face stack. Each imports transformers lazily, so the core works without it."""

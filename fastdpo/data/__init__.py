"""Preference data: sources, row formats, tokenization, validation, pair-aware packing."""

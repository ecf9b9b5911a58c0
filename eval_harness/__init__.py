"""Async honesty scoring of any OpenAI-compatible endpoint."""

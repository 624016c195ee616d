"""Dated prices: API tokens (from LiteLLM's map) and hardware presets."""

"""The task: its types, reading splits, data checks and prompt templates."""

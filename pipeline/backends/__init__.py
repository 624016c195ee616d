"""Where an arm's calls go: a local model in this process, or any OpenAI-compatible HTTP API."""

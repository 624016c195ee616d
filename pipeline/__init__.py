"""roi: should we keep prompting, or fine-tune a small model? Measured, priced, tracked.

The folders are the architecture (README, "Architecture"); lower layers never import higher ones."""

"""LoRA fine-tuning: the Trainer set-up, distributed launch, and the training step's speed parts."""

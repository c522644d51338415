"""Training: batches, losses, the LoRA loop, checkpoints, multi-process launch, DPO and RL."""

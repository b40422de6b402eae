"""Training: tiny and default model builders, fine-tuning (LoRA or full, DDP). Imports torch: never from the daemon."""

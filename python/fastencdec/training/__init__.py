"""Training: data alignment for distillation, tokenizer, data, trainers."""

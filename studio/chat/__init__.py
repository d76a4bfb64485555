"""Stage 4, chat: the base model and base + adapter side by side, and their evaluation."""

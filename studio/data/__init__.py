"""Stage 1, the dataset: reading files (`load`), the chat format and loss mask (`chat_format`),
PII detection and redaction (`pii`)."""

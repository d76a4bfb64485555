"""Stage 1, the dataset. One module per concern:

- `load`: the one dataset parser, `load_dataset_file` -> `DatasetReport` (row validation);
- `read`: a file's kind, JSON Lines / JSON records, `DatasetError`, keeping an upload;
- `table`: CSV/TSV and Parquet, and mapping columns onto Alpaca fields;
- `normalize`: Alpaca / ShareGPT / messages rows -> chat messages;
- `tokens`: token lengths and statistics with the model's template, the one-row preview;
- `split`: the seeded train/validation split and the JSONL a run trains from;
- `search`: search and paging over rows (Dataset tab);
- `scan`: the Dataset tab's scan cache and mapped-dataset writes;
- `chat_format`: the chat format and loss mask;
- `pii`: PII detection and redaction.
"""

"""Stage 3, training: a run config becomes a prepared run, a trainer, and a run folder.

A run goes one way, each module importing only those before it:
`jobs` (start a run: in the foreground, or as the Train tab's background job) -> `prepare`
(config to a prepared run: checks, data, run folder) -> `recipe` (training args, LoRA, the
trainer) -> `loop` (execute: progress, stop, failures, saving), which ends with `checks`
("did it learn?", the model card).

Run headless: `python -m studio.train RUN.yaml` (`cli`).
"""

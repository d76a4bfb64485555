"""Stage 3, training: a run config becomes a prepared run, a trainer, and a run folder.

A run is a pipe, each module importing only those before it:
`jobs` (start a run: in the foreground, or as the Train tab's background job) -> `prepare`
(config to a prepared run: checks, the dataset read once, run folder; then its tokens) ->
`recipe` (`build`: the model, LoRA, training args and trainer, in one call) -> `loop`
(execute: progress, stop, failures, saving, the run's record), which ends with `checks`
("did it learn?", the model card). The loop never calls back into `prepare`.

Run headless: `python -m studio.train RUN.yaml` (`cli`).
"""

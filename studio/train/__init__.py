"""Stage 3, training: a run config becomes a prepared run, a trainer, and a run folder.

Run headless: `python -m studio.train RUN.yaml` (see `__main__`)."""

"""Runs kept on disk: run directory files, checkpoints, lock, signals, reports, plots, progress."""

"""A Hydra sweeper for current Optuna (>= 4): trials are Hydra jobs, studies live in any
Optuna storage (SQLite by default, PostgreSQL for many workers) and resume on rerun."""

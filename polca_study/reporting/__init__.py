"""Reporting: what a reader sees of runs, after the fact or as they go.

`tracking` is the W&B run of a job, `charts` its native W&B plots, `compare` the tables
over jobs and seeds of a multirun, `workspace` the saved W&B views of a comparison.
"""

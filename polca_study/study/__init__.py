"""The study: a config in, cached stages run in order, results out.

`config` holds the schemas Hydra fills, `sources` where snapshots come from (our
trainer, a recorded store, Hugging Face revisions), `cache` the stage cache keyed by the
config each stage depends on, `bases` and `stages` the cached basis and decomposition
stages, `environment` the pinned threads and library versions, `pipeline` the run from
data to `summary.json`.
"""

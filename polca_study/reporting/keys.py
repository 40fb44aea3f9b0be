"""Which settings say how a job runs rather than what it measures.

One list for every reader: a comparison leaves these out of its conditions, and an
Optuna study (the sweeper's `fingerprint_exclude`) out of what it was built from.
Light on purpose: the sweeper plugin imports it when Hydra discovers plugins.
"""

# Where a job's results go and how they are shown: never the results.
RUN_KEYS = ("cache_dir", "logger", "progress", "figures", "save_trajectories", "force")
# How a job computes: its numbers change in the last bits at most. Jobs that differ in
# them are one condition of a comparison; a study's fingerprint keeps them, so one
# study's trials are computed alike.
MACHINE_KEYS = ("num_threads", "device")
# The named study a job ran in (`+sweep=`): seeds of one condition from several studies
# join one comparison. Not for a study's fingerprint: the sweeper composes its trials'
# config with it (it selects the sweeper).
STUDY_KEYS = ("sweep",)

# The Optuna study and trial a job runs for: the sweeper sets them in the job's
# environment, the job puts them in its W&B config (trial and run lead to each other).
STUDY_ENV, TRIAL_ENV = "POLCA_STUDY_NAME", "POLCA_TRIAL_NUMBER"

"""The command line: the `polca-study` Hydra app (`cli`), the checks a command gets
before any job starts (`preflight`), and the export of a tuning study's settings
(`tuning`)."""

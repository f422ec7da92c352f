"""File names of an encoding output folder (shared by the cohort job and the traversal)."""

JOB_FILE = "encode.json"
"""The job's description and key: a resumed job must match it."""
DONE_FILE = "done.json"
"""Written last in a patient's folder: the patient is complete."""
SUMMARY_FILE = "summary.json"
"""What the last run did: patients encoded and reused, and those left out with the reason."""
TABLES = ("features.csv", "tiles.csv", "metrics.csv", "skipped.csv", "traverse_std.csv")

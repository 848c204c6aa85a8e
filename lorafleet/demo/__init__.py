"""`lorafleet demo`: the end-to-end proof (run.py drives it, report.py writes what it found)."""

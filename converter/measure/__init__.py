"""Measure and use: separate songs with a file, bench it, sweep seeds, read provider placement."""

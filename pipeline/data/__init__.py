"""Data: ingest, cleaning, Great Expectations suites, the story world, the n-gram mimic, drift."""

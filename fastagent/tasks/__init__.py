"""Bundled offline ML tasks (one folder each) and the loader for the MLE-bench layout."""

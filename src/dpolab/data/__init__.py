"""Preference data: files and datasets -> PreferencePair records -> token ids -> batches."""

"""Corpora, item sets, validators and the DataModule."""

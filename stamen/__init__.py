"""Stamen: shared pieces of the app (configuration, message keys, command line)."""

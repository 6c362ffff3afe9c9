"""The instrumentation layer (per-phase timings, resource samples, CSV reports): issue 3."""

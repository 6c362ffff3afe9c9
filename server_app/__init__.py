"""The ServerApp: configuration, device profiles, strategy, rounds, run directory."""

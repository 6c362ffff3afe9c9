"""Deployments: the loopback launcher (local.py); testbed and compose files come later."""

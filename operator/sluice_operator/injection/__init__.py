"""Sidecar injection: its settings, the plan of a pod's rewrite, the sidecar container."""

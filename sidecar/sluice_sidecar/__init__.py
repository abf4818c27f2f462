"""The Sluice sidecar: a streaming reverse proxy that enforces the policy core's token buckets."""

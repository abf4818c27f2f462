"""The Sluice operator (kopf): reconciles RateLimitPolicy resources and API-key Secrets into
Redis through :mod:`sluice_core`. It never imports the sidecar."""

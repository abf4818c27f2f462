"""The collector's own Prometheus metrics (served on ``--listen``, ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class AnalyticsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.lag_entries = Gauge("sluice_analytics_stream_lag_entries",
                                 "Usage windows in the stream not yet applied (undelivered + pending)",
                                 registry=r)
        self.lag_seconds = Gauge("sluice_analytics_stream_lag_seconds",
                                 "Age of the oldest usage window not yet applied", registry=r)
        self.windows = Counter("sluice_analytics_windows_applied", "Usage windows applied", registry=r)
        self.requests = Counter("sluice_analytics_requests_applied",
                                "Decisions the applied windows represent", registry=r)
        self.rows = Counter("sluice_analytics_rows_upserted", "Rollup rows upserted", registry=r)
        self.duplicates = Counter("sluice_analytics_duplicates_skipped",
                                  "Windows read again after being applied (skipped)", registry=r)
        self.stale = Counter("sluice_analytics_windows_stale",
                             "Windows refused: older than --keep-applied-h (they might count twice)",
                             registry=r)
        self.trimmed = Counter("sluice_analytics_stream_trimmed",
                               "Stream entries removed once every consumer group acknowledged them",
                               registry=r)
        self.consumers_forgotten = Counter(
            "sluice_analytics_consumers_forgotten",
            "Consumers deleted from the usage group: nothing pending, idle past --forget-consumers-idle-h",
            registry=r)
        self.bad = Counter("sluice_analytics_bad_entries",
                           "Stream entries that are no usage window (set aside, acknowledged)", registry=r)
        self.db_errors = Counter("sluice_analytics_db_errors",
                                 "Batches or rollup runs the database failed (retried)", registry=r)
        self.redis_errors = Counter("sluice_analytics_redis_errors", "Redis calls that failed (retried)",
                                    registry=r)
        self.batch_seconds = Histogram("sluice_analytics_batch_seconds",
                                       "Time to apply one batch (one SQL transaction)", registry=r)
        self.summaries = Counter("sluice_analytics_summaries_written",
                                 "Usage summaries written to Redis for the policies' status.usage", registry=r)
        self.rollup_runs = Counter("sluice_analytics_rollup_runs", "Rollup and retention runs", registry=r)
        self.near_limit = Counter("sluice_analytics_near_limit_alerts",
                                  "Near-limit alerts sent (once per policy, alert, client and period)", registry=r)
        self.near_limit_suppressed = Counter(
            "sluice_analytics_near_limit_suppressed",
            "Near-limit crossings not sent: past --alert-max-per-period clients of their alert and period",
            registry=r)
        self.near_limit_dropped = Counter("sluice_analytics_near_limit_dropped",
                                          "Near-limit deliveries dropped: their queue was full", ["what"],
                                          registry=r)
        self.near_limit_passes = Counter("sluice_analytics_near_limit_passes",
                                         "Near-limit detection passes completed", registry=r)
        # result: delivered, status (the receiver answered non-2xx), failed (no answer: timeout,
        # connection), refused (the URL's address is one the collector must not call), dropped
        # (the host's or the whole delivery queue was full)
        self.webhooks = Counter("sluice_analytics_alert_webhooks", "Near-limit alert webhook deliveries by result",
                                ["result"], registry=r)

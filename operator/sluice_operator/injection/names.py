"""The names injection reads from and writes into a pod: the label that asks for it, the
annotations, the injected container, its admin port and its volume. ``sluice services`` and
the tests find the sidecar by these too."""

INJECT_LABEL = "sluice.dev/inject"  # "true" on a pod or its namespace; "false" on a pod opts out
INJECTED_ANNOTATION = "sluice.dev/injected"  # set by the patch: "true"
PORT_ANNOTATION = "sluice.dev/port"  # name of the app's port the sidecar takes over
SIDECAR_PORT_ANNOTATION = "sluice.dev/sidecar-port"  # number the sidecar listens on
SIDECAR_NAME = "sluice-sidecar"
PODINFO_VOLUME = "sluice-podinfo"
PODINFO_MOUNT = "/etc/sluice/podinfo"
REDIS_CA_VOLUME = "sluice-redis-ca"
REDIS_CA_CONFIGMAP = "sluice-redis-ca"  # the operator's copy of the Redis CA, in each injected namespace
REDIS_CA_MOUNT = "/etc/sluice/redis-ca"
REDIS_CA_KEY = "ca.crt"
ADMIN_PORT_NAME = "sluice-admin"
DRAIN_PATH = "/drain"  # the sidecar's admin endpoint the app's preStop hook calls
DRAIN_TOKEN_HEADER = "X-Sluice-Drain-Token"

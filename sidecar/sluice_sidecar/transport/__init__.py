"""The sidecar's transport room: bytes on the wire to Redis (:mod:`.resp`, :mod:`.topology`) and
to the upstream (:mod:`.httppool`). Every failure leaves it as one :class:`.errors.TransportError`
with a ``reason``; what Sluice does with the bytes (deciding, proxying) lives outside."""

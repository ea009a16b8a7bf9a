"""The operator commands: ``publish`` and ``dev`` (``publish_dev``), ``report``,
``raw-resend`` (``raw``), ``backup``, ``budget``, ``markup`` (listed in Faust's CLI by
``billing``), and the one-line-error click group they share (``group``). ``replay`` lives
with the replay (:mod:`agents.replay.command`), ``refresh`` with the refresh."""

"""The operator commands: ``publish`` and ``dev`` (``publish_dev``), ``report``,
``raw-resend`` (``raw``), ``backup``, ``budget``, ``markup`` (click groups that run
without the Faust app), and the one-line-error click group they share (``group``).
``replay`` lives with the replay (:mod:`agents.replay.command`), ``refresh`` with the
refresh. agents/wiring.py registers every one of them in Faust's CLI."""

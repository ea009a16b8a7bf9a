"""The running parts, each a ``mode.Service`` the Faust app starts or an operator
command. There are no Faust agents: the worker uses no Faust consumer (see
:class:`streams.app.ServicesBoot`).

* ``hot_path/``: the hot path, one object per stage (``service``, ``ownership``,
  ``batch_reader``, ``prepare``, ``committer``) and its home-partition state
  (``home_partition``, ``home_state``, ``home_assignor``, ``dedupe``, ``rebuild_ids``,
  ``snapshots``); see :mod:`agents.hot_path`;
* ``conditions``: failing stages retried and reported, shared by the hot path and the
  summary writer;
* ``summary_writer/``: the batch log into the summary DB, the rollup, the writer's claim;
* ``replay/``: ``usage-stream replay`` and its fences;
* ``web/``: the HTTP views, ``/ready`` and the usage query;
* ``refresh`` (NBP rates and OpenRouter prices), ``prices_feed``, ``budgets`` (alerts);
* ``commands/``: the operator commands; ``dev/``: the local stack of ``usage-stream dev``.

No module here registers itself with the app when imported: ``wiring`` is the
composition root, where every service, page, timer, task, command, start-up check and
shutdown hook is registered, and ``main`` is the console script that calls it (above
every other module: nothing imports ``wiring`` or ``main``).
"""

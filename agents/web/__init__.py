"""The worker's HTTP side: the web views and ``/metrics`` (``server``), ``GET /ready``
(``readiness`` and its probes in ``health``) and ``GET /v1/usage/query``
(``usage_query``)."""

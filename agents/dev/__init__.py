"""``usage-stream dev``: the local stack (``stack``: embedded broker, a worker process,
the demo producer), its status line (``status``), the synthetic events (``demo``) and the
demo's budget, price rule and alert receiver (``demo_billing``). It sits in ``agents``
because it drives the whole product, the summary DB included."""

"""usage-stream: the Faust app, topics, event schema and codec, producer side."""

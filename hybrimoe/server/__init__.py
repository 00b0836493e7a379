"""OpenAI-compatible HTTP server over one Engine: `create_app(engine)`; `hybrimoe serve` runs it."""

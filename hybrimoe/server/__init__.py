"""OpenAI-compatible HTTP server over one Engine: `create_app(engine)`; `hybrimoe serve` runs it.

    hybrimoe serve --model DIR [--host 127.0.0.1] [--port 8000] [--dtype bf16] [--max-body-bytes N]
                   [--served-model-name NAME]

Endpoints
    GET  /v1/models, /v1/models/{id}   the one served model (id = directory name or --served-model-name)
    POST /v1/chat/completions          messages (system, developer, user, assistant; text content)
    POST /v1/completions               prompt: a string, a one-string list, or token ids
    GET  /health                       {"status": "ok"} while the engine thread runs, else 503
    GET  /metrics                      Prometheus text format (version 0.0.4)
Both completion endpoints honour model, max_tokens (chat: also max_completion_tokens; default: the
rest of the context for chat, 16 for completions), temperature (default 1.0; 0 = greedy), top_p,
top_k (an extension, as in vLLM), seed, stop (string or up to 4), n (1 only), stream,
stream_options.include_usage. Streams are Server-Sent Events ending with `data: [DONE]`.

Errors are `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON, wrong types,
missing fields, unsupported roles or features (n > 1, logprobs, tools), max_tokens < 1, a prompt or
prompt + max_tokens past the context; 404 for an unknown model or path; 413 for a body over
--max-body-bytes (declared or streamed); 500 if generation fails. The server keeps serving.

One worker thread owns the Engine (single-sequence, not thread-safe) and serves requests in order;
a client that disconnects frees the engine after the current token, or is dropped from the queue.

Metrics: hybrimoe_server_requests_total{endpoint,status}, _prompt_tokens_total,
_generation_tokens_total, _decode_tokens_per_second, _time_to_first_token_seconds (histogram),
_queue_wait_seconds, _request_duration_seconds, _cancelled_requests_total, _queue_depth,
_running_requests; and every numeric key of `Engine.stats()` as a gauge `hybrimoe_<key>` (nested
dicts flattened with `_`, string values as labels of `hybrimoe_engine_info`).
"""

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # --max-body-bytes; here so that the CLI needs no fastapi to list it

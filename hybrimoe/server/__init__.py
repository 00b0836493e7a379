"""OpenAI-compatible HTTP server over one Engine: `create_app(engine, ServerOptions)`; `hybrimoe serve` runs it
(`hybrimoe.server.runner.run_server`: timeouts, graceful shutdown).

    hybrimoe serve --model DIR [--host 127.0.0.1] [--port 8000] [--dtype bf16] [--served-model-name NAME]
                   [--threads N] [--max-batch 1] [--max-queue 16] [--api-key KEY ...] [--allowed-hosts H,...]
                   [--allowed-origins URL,...] [--max-body-bytes N] [--body-timeout 30] [--header-timeout 10]
                   [--keep-alive-timeout 5] [--shutdown-timeout 10]

Endpoints
    GET  /v1/models, /v1/models/{id}   the one served model (id = directory name or --served-model-name)
    POST /v1/chat/completions          messages (system, developer, user, assistant; text content)
    POST /v1/completions               prompt: a string, a one-string list, or token ids
    GET|HEAD /health                   {"status": "ok"} while the engine thread runs and takes requests, else 503
    GET  /metrics                      Prometheus text format (version 0.0.4)
Both completion endpoints honour model, max_tokens (chat: also max_completion_tokens; default: the
rest of the context for chat, 16 for completions), temperature (default 1.0; 0 = greedy), top_p,
top_k (an extension, as in vLLM), seed, stop (string or up to 4), frequency_penalty, presence_penalty,
logit_bias, n (1 only), stream, stream_options.include_usage. Accepted and ignored (they change nothing
here): user, metadata, store, service_tier, prompt_cache_key, safety_identifier, parallel_tool_calls.
Everything else is refused with a 400 naming the field: logprobs, tools, tool_choice other than "none",
response_format other than text (no JSON mode), best_of > 1, suffix, echo, and any unknown field that
is not null. Streams are Server-Sent Events ending with `data: [DONE]`.

Access (`hybrimoe.server.guards`): with --api-key (or $HYBRIMOE_API_KEYS) /v1/* and /metrics need
`Authorization: Bearer KEY` (401); /health stays open. Bound to loopback, only Host headers naming
localhost / 127.0.0.1 / ::1 are served (403; --allowed-hosts widens); a browser Origin must be the same
origin or in --allowed-origins (403), which also turns on CORS for those origins; POST bodies must be
application/json (415).

Admission: up to --max-batch requests run (default 1); up to --max-queue more wait (being tokenised or
queued); beyond that 429 with Retry-After (waiting requests x mean service time / --max-batch seconds). Prompts are tokenised and checked against the context on a tokenizer pool before
they are queued (a prompt whose length in characters cannot fit is refused without tokenising).

Errors are `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON, invalid Unicode
(a lone surrogate), wrong types, missing fields, unsupported roles or fields, max_tokens < 1, a prompt
or prompt + max_tokens past the context; 401, 403, 415 as above; 404 for an unknown model or path;
405 (with Allow) for a wrong method; 408 for a body not received within --body-timeout; 413 for a body
over the limit (default 64 KiB + 32 bytes per context token); 429 for a full queue; 500 `server_error`
if the engine fails (a final `data: {"error": ...}` event once a stream has started); 503 while shutting
down or when the engine worker has died. The server keeps serving after every 4xx and 500.

One worker thread owns the Engine (not thread-safe) and steps a batch (`hybrimoe.server.batching`):
with --max-batch 1, `Engine.stream` of one request at a time (the server before batching); with N > 1
a `BatchEngine`: a queued request joins the running batch as soon as fewer than N run (its prefill
between decode steps), every step gives each running request its next token, and each request's
chunks go to its own event queue, so its text is its solo run's. At start the KV cache of N
sequences at the context must fit the free memory of the engine's device (host RAM on the CPU), else
the server refuses to start with the numbers. A request whose checks fail is refused alone (400); a
failure in one request's sampling ends that request only; a failed forward ends the requests in it
(500 / error event) and the server goes on. A client that disconnects (or a request past the
shutdown grace) leaves the batch at the next step, freeing its slot; a queued one is dropped.
SIGTERM: stop listening, 503 for new and queued requests, the running ones have --shutdown-timeout
seconds to finish (then they end with an error event / 503), exit status 0.

Metrics: hybrimoe_server_requests_total{endpoint,status}, _rejected_requests_total{reason},
_prompt_tokens_total, _generation_tokens_total, _decode_tokens_per_second, _time_to_first_token_seconds
(histogram, per request: arrival to its first token), _queue_wait_seconds (arrival to joining the
batch), _request_duration_seconds, _cancelled_requests_total, _queue_depth, _max_queue,
_running_requests (in the batch), _max_batch, _batch_size (histogram of requests per engine step; mean
= _sum / _count), _engine_threads; and every numeric key of `Engine.stats()`: cumulative
ones as counters `hybrimoe_<key>_total`, the rest as gauges `hybrimoe_<key>` (nested dicts flattened
with `_`, string values as labels of `hybrimoe_engine_info`).
"""

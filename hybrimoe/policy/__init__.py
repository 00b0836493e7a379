"""Policy side: scheduling, caching, prefetching, cost model and model shapes. Pure Python, no torch."""

"""`hybrimoe plan`: what a model will do on a machine before its weights are downloaded.

    target.py      --model as a shape name, config.json or checkpoint directory -> Target
    memory.py      GPU and host bytes per expert format and policy (the runtime's own accounting)
    synthetic.py   routing for models without a trace, fitted per layer to the packaged dev traces
    routing.py     which routing a plan simulates (--trace, packaged eval trace, synthetic)
    predict.py     simulated TTFT and decode tokens/s of one row (hybrimoe.sim, eager presets)
    build.py       make_plan: rows per policy, format and cache; the recommendation
    recommend.py   the fastest row that fits as the exact `hybrimoe serve` command line
    report.py      text and JSON rows;  plot.py: decode tokens/s against GPU memory (PNG)
"""

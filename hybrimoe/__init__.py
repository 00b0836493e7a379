"""hybrimoe: run Mixture-of-Experts LLMs on one GPU plus host memory (HybriMoE, DAC 2025)."""

__version__ = "0.1.0"

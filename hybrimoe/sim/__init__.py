"""Trace-driven simulator of HybriMoE and its baselines on a virtual clock (pure Python, no torch)."""

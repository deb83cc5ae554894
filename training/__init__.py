"""Training loop, optimisers, results and benchmark for the attention comparison."""

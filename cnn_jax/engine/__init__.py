"""The training engine: state, step, optimisers, the loop, evaluation, parallelism, compile cache."""

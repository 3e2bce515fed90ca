"""`--method auto`: the best model within an accuracy budget — measured per-layer sensitivity and latency, an
additive prediction solved as a knapsack, every candidate verified on held-apart data, never a worse model."""

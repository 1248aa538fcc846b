"""Budget math: exact counts of a pruned model (channel, volume, params, FLOPs), soft budgets
for ChipNet, thresholding scores to a budget, and measured-latency tables for latency budgets."""

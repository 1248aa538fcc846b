"""Pruning methods: ChipNet (learned gates, budget and crispness losses), CHIP (channel
independence), and the baselines (random, L1, uniform). Each turns a trained model into
kept-channel masks; budgets/ says how much, surgery/ makes the smaller model."""

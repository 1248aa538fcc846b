"""Deployment: a pruned (or dense) model as an ONNX file with a dynamic batch dimension,
checked against PyTorch on real images, and timed in ONNX Runtime, the runtime a deployer
runs it in."""

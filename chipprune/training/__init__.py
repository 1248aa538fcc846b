"""Training: the train/eval loop on device-resident data, multi-process (torch.distributed),
resume after a kill, and checkpoints that load with weights_only=True."""

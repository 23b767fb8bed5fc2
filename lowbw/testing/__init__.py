"""Harnesses that check lowbw against references: one-process gradients, torch.distributed.pipelining,
PipeDream-2BW's update rule. Used by the tests and by anyone adding a schedule; the library never imports
this package."""

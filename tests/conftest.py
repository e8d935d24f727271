import opsq  # noqa: F401  (registers torch.ops.opsq.*)

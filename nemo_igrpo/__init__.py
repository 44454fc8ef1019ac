"""nemo-igrpo: iGRPO (iterative self-feedback GRPO) post-training on megatron-core."""

__version__ = "0.1.0"

"""The CPU demo: a tiny model learns to pick the larger of two numbers with iGRPO (`igrpo demo`)."""

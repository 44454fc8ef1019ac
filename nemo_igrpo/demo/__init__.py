"""The CPU demo: a tiny model learns two-digit addition with iGRPO (see `igrpo demo --help`)."""

"""`python -m nemo_igrpo ...`: same as the `igrpo` console script (and works under torchrun)."""

from nemo_igrpo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m sigmactl`."""

from sigmactl.cli import main

main()

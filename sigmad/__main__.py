"""`python -m sigmad` runs the sigmad command line."""

from sigmad.cli import main

main()

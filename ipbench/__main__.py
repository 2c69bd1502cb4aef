"""`python -m ipbench` runs the same CLI as the `ipbench` console script."""

from ipbench.cli import main

main()

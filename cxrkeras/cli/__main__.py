"""`python -m cxrkeras.cli ...`: the `cxrkeras` command."""

from cxrkeras.cli import main

main()

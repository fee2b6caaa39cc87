"""`python -m cli`: the same as the `crossmodal` command."""

from cli.app import main

main()

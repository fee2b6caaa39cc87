"""The `crossmodal` command line (Typer), split by command group; only this package and the page print or exit."""

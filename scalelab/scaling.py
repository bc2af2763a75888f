"""Power-law fits for sweeps (placeholder, filled in below)."""
import typer

sweep_app = typer.Typer(no_args_is_help=True, help="Run a grid of training runs and fit scaling laws.")

"""`python -m scalelab ...` is the `scalelab` command: the MCP server starts its jobs this way, with
`sys.executable`, so a job runs in the server's own interpreter and environment whatever is on PATH.

`runpy` rather than `from scalelab.cli import main`: this module is the CLI's other spelling, not a user of
it, and the layering rule that nothing imports the CLI (tests/test_layers.py) stays true as written."""

import runpy

runpy.run_module("scalelab.cli", run_name="__main__", alter_sys=True)

"""The commands layer: one module per `memprune` verb.

A command module resolves its inputs (testbed defaults come from `defaults`, the only module that names the
testbed's files), refuses bad outputs before any work, calls the library, writes its folder atomically with a
run.json, and returns the summary the CLI prints. The library modules below it write no files beyond what their
objects' `save` methods do; `memprune.cli` only declares click options and calls these modules.
"""

"""moe_embed.testing: helpers shared by the tests and the benchmarks (installed, so both import
them by name, without sys.path edits): real servers on loopback ports, real clients, readers of
/proc. Nothing in it stands in for the project's code; it only starts, calls and measures it."""

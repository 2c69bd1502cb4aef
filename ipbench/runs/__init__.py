"""What a command does, below the command line: the run context, the configuration plan, the one
batch loop, and one module per command (eval, sweep, flops/speed, the analyses, visualize)."""

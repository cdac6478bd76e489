"""EC2T: its pure math (ternary), chain step (chain) and exact-reference mode."""

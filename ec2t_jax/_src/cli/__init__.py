"""The command-line wing: argparse front ends of export, report and compress."""

"""One module per command's logic. Only stages and cli.py touch the disk."""

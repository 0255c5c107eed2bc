"""Client algorithms: what a client does with its data in a round, one module per method."""

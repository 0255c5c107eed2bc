"""Server-side strategies: Flower strategies chosen by name, and the wrapper that runs them over fedkd's clients."""

"""Authentication and limits: verification keys, JWT bearer tokens, the development key, rate limits."""

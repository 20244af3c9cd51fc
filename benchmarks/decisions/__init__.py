"""Records behind design decisions: one way against another, measured once."""

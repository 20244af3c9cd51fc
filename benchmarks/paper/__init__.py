"""Model quality against published results: reproductions of papers' tables and findings."""

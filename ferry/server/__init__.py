"""The OpenAI-compatible HTTP server: `ferry serve MODEL` (see app.py). No torch is imported here."""

"""Training kit for ferry's in-house models (not part of the ferry package)."""

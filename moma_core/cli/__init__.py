"""Command-line entry points of moma_core (moma-teacher, moma-distill)."""

"""Stream agents of FinFlow."""

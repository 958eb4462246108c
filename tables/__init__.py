"""Per-account table state: windows, profile, de-duplication."""

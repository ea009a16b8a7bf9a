"""The 13:00 refresh: NBP and OpenRouter clients, reference tables, run_refresh."""

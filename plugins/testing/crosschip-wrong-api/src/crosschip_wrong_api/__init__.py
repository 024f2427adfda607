"""Test-only crosschip plugin package."""

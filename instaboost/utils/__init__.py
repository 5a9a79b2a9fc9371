"""Small framework-wide utilities (seeding)."""

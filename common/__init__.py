"""The lowest layer: errors, files written whole, bounded JSON, device facts and report helpers; imports nothing of the project above it."""

"""The arms of the experiment: one file each (arms/<name>.py defines ARM), found by arms/registry.py."""

"""The experiment's one configuration object, its command-line flags and config files, and value checks."""

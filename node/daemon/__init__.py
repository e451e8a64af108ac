"""The daemon: configuration, lifecycle, HTTP health/metrics, operator entry points."""

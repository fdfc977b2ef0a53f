"""Load tests and benchmarks: locust users for OpenAI-style endpoints, reports, side-by-side comparison."""

"""The worker process: claims jobs, drives backends, reaps lost leases."""

"""The sdfleet command line: runs the API, a worker or the whole local stack, and talks to the API."""

"""The sdfleet command line: runs the API, a worker or the whole local stack, and talks to the API."""

from shared.telemetry import opt_out

opt_out()  # before anything here imports OpenVINO, NNCF or Hugging Face's libraries: no usage reports

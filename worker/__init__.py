"""The model worker: one OpenVINO pipeline per process, jobs from its model's queues."""

from shared.telemetry import opt_out

opt_out()  # before anything here imports OpenVINO, NNCF or Hugging Face's libraries: no usage reports

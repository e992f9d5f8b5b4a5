"""The model tools: export to OpenVINO IR (LoRA fusing, weight compression), tiny test models, hub IDs."""

from shared.telemetry import opt_out

opt_out()  # before anything here imports OpenVINO, NNCF or Hugging Face's libraries: no usage reports

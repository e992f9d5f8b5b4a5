"""The model tools: export to OpenVINO IR (LoRA fusing, weight compression), tiny test models, hub IDs."""

"""The ops worker: webhook deliveries, the reconciler, retention."""

"""The evaluation room: ranking metrics, a store's evaluation of a model and baselines, and audience metrics."""

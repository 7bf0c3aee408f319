"""The training side: plans on trainable models, the built-in trainer and the methods' fine-tuning loop."""

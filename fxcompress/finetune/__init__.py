"""The training side: the built-in trainer, the methods and their fine-tuning loop (plans on trainable models are
`fxcompress.trainable`, below the compiler's entry points)."""
